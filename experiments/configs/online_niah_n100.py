"""Needle at 25 % kept, compress after vs during prefill (n=100), 2k; 4k / 8k with
--config.lengths=4096 --config.out=results/eval_online_niah_4k.jsonl (8080, _8k_).

Reproduces results/eval_online_niah_2k.jsonl (docs/results.md, "needle at 2k, 25 % kept,
compress after vs during prefill").
"""

from ml_collections import config_dict

LAUNCHER = "experiments.evaluate"


def get_config():
  """5 prefill scorers, every cell after and during prefill."""
  c = config_dict.ConfigDict()
  c.method = "knorm,snapkv,h2o,tova,expected_attention"
  c.ratio = "0.25"
  c.lengths = "2048"
  c.num_samples = 100
  c.compress_during_prefill = True
  c.out = "results/eval_online_niah_2k.jsonl"
  return c
