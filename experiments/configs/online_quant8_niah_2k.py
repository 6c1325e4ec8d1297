"""Needle at 2k, 50 % kept + KIVI 2-bit, after prefill / during prefill / packed after every
chunk (keys staged at 8 bits), n=100.

Reproduces results/eval_online_quant8_niah_2k.jsonl (docs/results.md, "needle at 2k, 50 % kept
+ KIVI 2-bit").
"""

from ml_collections import config_dict

LAUNCHER = "experiments.evaluate"


def get_config():
  """tova+kivi and knorm+kivi in all three prefill modes."""
  c = config_dict.ConfigDict()
  c.method = "tova+kivi,knorm+kivi"
  c.ratio = "0.5"
  c.lengths = "2048"
  c.num_samples = 100
  c.compress_during_prefill = True
  c.quantize_each_chunk = True
  c.out = "results/eval_online_quant8_niah_2k.jsonl"
  return c
