"""kvlab vs kvpress end to end on a GPU, bf16, on the default model's random twin: snapkv /
knorm, 1k and 4k, median of 3 alternated cases.

Reproduces results/bench_vs_kvpress_twin_bf16_h200.json (docs/results.md, GPU "kvlab vs kvpress
end to end"; README 4.97x / 5.58x). The twin: python -m experiments.random_twin
--out=.devcarry/smollm2-twin (what experiments/gpu_checks.sh makes); elsewhere --config.model=DIR.
"""

from ml_collections import config_dict

LAUNCHER = "experiments.bench_vs_kvpress"


def get_config():
  """The twin in bfloat16, 3 cases per method and length."""
  c = config_dict.ConfigDict()
  c.model = ".devcarry/smollm2-twin"
  c.methods = "snapkv,knorm"
  c.lengths = "1024,4096"
  c.cases = 3
  c.dtype = "bfloat16"
  return c
