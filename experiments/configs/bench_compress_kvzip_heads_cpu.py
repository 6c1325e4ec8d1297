"""kvzip_heads' overhead at 4k beside kvzip, tova and knorm on the CPU, best of 3.

Reproduces results/bench_compress_kvzip_heads_cpu.json (docs/results.md, "kvzip_heads' cost").
"""

from ml_collections import config_dict

LAUNCHER = "experiments.bench_compress"


def get_config():
  """4 methods, 4096-token prompt, 3 repetitions."""
  c = config_dict.ConfigDict()
  c.method = "kvzip_heads,kvzip,tova,knorm"
  c.length = 4096
  c.reps = 3
  c.out = "results/bench_compress_kvzip_heads_cpu.json"
  return c
