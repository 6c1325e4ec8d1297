"""Needle with KVzip, per head and per layer, 1k / 2k / 4k, n=100, 25 / 50 / 75 % kept.

Reproduces results/eval_niah_n100_kvzip.jsonl (docs/results.md, "needle with KVzip").
"""

from ml_collections import config_dict

LAUNCHER = "experiments.evaluate"


def get_config():
  """kvzip and kvzip:share=layer on the leaderboard's samples."""
  c = config_dict.ConfigDict()
  c.method = "kvzip,kvzip:share=layer"
  c.ratio = "0.25,0.5,0.75"
  c.lengths = "1024,2048,4096"
  c.num_samples = 100
  c.out = "results/eval_niah_n100_kvzip.jsonl"
  return c
