"""h2o / keyformer overhead at 4k on the CPU, best of 2.

docs/results.md cites the run with uninitialised buffers:
--config.out=results/bench_compress_h2o_keyformer_empty_cpu.json.
"""

from ml_collections import config_dict

LAUNCHER = "experiments.bench_compress"


def get_config():
  """h2o and keyformer, 4096-token prompt, 2 repetitions."""
  c = config_dict.ConfigDict()
  c.method = "h2o,keyformer"
  c.length = 4096
  c.reps = 2
  c.out = "results/bench_compress_h2o_keyformer_maskbias_cpu.json"
  return c
