"""kvlab vs kvpress 0.5.5 on the CPU: prefill + compress (50 %) + 32 greedy tokens, snapkv /
knorm, 1k and 2k, median of 5 alternated cases.

Reproduces results/bench_vs_kvpress_prefill_rows_cpu.json (docs/results.md, "kvlab vs kvpress
0.5.5 after two CPU attention changes"; README 1.52x / 1.54x). Earlier runs of the same
settings: --config.out=results/bench_vs_kvpress_keys_lhs_cpu.json (and _maskbias_, _idle_).
"""

from ml_collections import config_dict

LAUNCHER = "experiments.bench_vs_kvpress"


def get_config():
  """snapkv and knorm, 50 % kept, 5 cases, 32 new tokens."""
  c = config_dict.ConfigDict()
  c.methods = "snapkv,knorm"
  c.lengths = "1024,2048"
  c.ratio = 0.5
  c.cases = 5
  c.new_tokens = 32
  c.out = "results/bench_vs_kvpress_prefill_rows_cpu.json"
  return c
