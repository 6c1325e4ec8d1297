"""Needle headline of the README (n=100): kvzip, kvzip_heads and tova at 25 / 50 / 75 % kept.

  python -m experiments.evaluate --config=experiments/configs/niah_n100.py
  python -m experiments.evaluate --config=experiments/configs/niah_n100.py --config.lengths=2048

Reproduces the README's needle rows at 1k (2k, 4k: --config.lengths=2048 / 4096); the committed
cells are in results/report_niah_n100_all/leaderboard.md.
"""

from ml_collections import config_dict

LAUNCHER = "experiments.evaluate"


def get_config():
  """niah_single, query-agnostic, noise haystack, 1k tokens, 100 samples per cell."""
  c = config_dict.ConfigDict()
  c.method = "kvzip,kvzip_heads,tova"
  c.lengths = "1024"
  c.num_samples = 100
  return c
