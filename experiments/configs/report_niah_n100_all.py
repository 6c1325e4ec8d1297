"""Issue 3's combined needle leaderboard (n=100): the 1k / 2k / 4k scorer files, KVzip and
kvzip_heads in one report.

Reproduces results/report_niah_n100_all/ (leaderboard.md, plots; README "## Results").
"""

from ml_collections import config_dict

LAUNCHER = "experiments.report"


def get_config():
  """Five committed JSONL files in, one leaderboard out."""
  c = config_dict.ConfigDict()
  c.inputs = ",".join([
      "results/eval_niah_1k_n100.jsonl", "results/eval_niah_2k_n100.jsonl",
      "results/eval_niah_4k_n100.jsonl", "results/eval_niah_n100_kvzip.jsonl",
      "results/eval_niah_n100_kvzip_heads.jsonl"])
  c.out_dir = "results/report_niah_n100_all"
  return c
