"""AdaKV's head-adaptive budgets over other scorers, needle 1k, n=100, 25 / 50 % kept.

Reproduces results/eval_niah_1k_n100_adakv_scorers.jsonl (docs/results.md, "AdaKV's
head-adaptive budgets over other scorers").
"""

from ml_collections import config_dict

LAUNCHER = "experiments.evaluate"


def get_config():
  """adakv:scorer=... for tova (also at alpha=1.0), h2o, knorm and expected_attention."""
  c = config_dict.ConfigDict()
  c.method = ("adakv:scorer=tova,adakv:scorer=tova:alpha=1.0,adakv:scorer=h2o,"
              "adakv:scorer=knorm,adakv:scorer=expected_attention")
  c.ratio = "0.25,0.5"
  c.lengths = "1024"
  c.num_samples = 100
  c.out = "results/eval_niah_1k_n100_adakv_scorers.jsonl"
  return c
