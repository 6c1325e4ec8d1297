"""The CPU decode ceiling: weight reads in the stacked and per-layer layouts, median
of 9, against the vs-kvpress run after the prefill change.

Reproduces results/bench_cpu_floors_weights_layouts_cpu.json (docs/results.md, CPU floors).
"""

from ml_collections import config_dict

LAUNCHER = "experiments.bench_cpu_floors"


def get_config():
  """The weights part only."""
  c = config_dict.ConfigDict()
  c.parts = "weights"
  c.reps = 9
  c.vs_kvpress = "results/bench_vs_kvpress_prefill_rows_cpu.json"
  c.out = "results/bench_cpu_floors_weights_layouts_cpu.json"
  return c
