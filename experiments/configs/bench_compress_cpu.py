"""Compression overhead (observe + compress) / prefill at 4k on the CPU, every prefill method and
kivi, best of 3.

Reproduces results/bench_compress_cpu.json (docs/results.md, compression overhead on the CPU).
"""

from ml_collections import config_dict

LAUNCHER = "experiments.bench_compress"


def get_config():
  """10 methods, 4096-token prompt, 3 repetitions."""
  c = config_dict.ConfigDict()
  c.method = ("snapkv,pyramidkv,adakv,h2o,tova,knorm,streaming_llm,expected_attention,"
              "keyformer,kivi")
  c.length = 4096
  c.reps = 3
  return c
