"""Needle with kvzip_heads (SmolLM2's committed head table), 1k / 2k / 4k, n=100.

Reproduces results/eval_niah_n100_kvzip_heads.jsonl (docs/results.md, "needle with
kvzip_heads"); resumable.
"""

from ml_collections import config_dict

LAUNCHER = "experiments.evaluate"


def get_config():
  """kvzip_heads at 25 / 50 / 75 % kept on the leaderboard's samples."""
  c = config_dict.ConfigDict()
  c.method = "kvzip_heads"
  c.ratio = "0.25,0.5,0.75"
  c.lengths = "1024,2048,4096"
  c.num_samples = 100
  c.out = "results/eval_niah_n100_kvzip_heads.jsonl"
  return c
