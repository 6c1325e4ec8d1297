"""Gemma 3 270M: kvlab vs transformers eager on the CPU, 1k prompt, best of 2.

Reproduces results/bench_generate_gemma3_cpu.json (docs/results.md, second model).
"""

from ml_collections import config_dict

LAUNCHER = "experiments.bench_generate"


def get_config():
  """gemma3-270m, 1024-token prompt, 2 repetitions."""
  c = config_dict.ConfigDict()
  c.model = "gemma3-270m"
  c.lengths = (1024,)
  c.reps = 2
  c.out = "results/bench_generate_gemma3_cpu.json"
  return c
