"""Full cache and knorm at 50 % on niah_single, 1k, four stdlib haystacks x five needle formats.

  python -m experiments.evaluate --config=experiments/configs/haystacks_needles_1k.py

Reproduces results/eval_haystacks_needles_1k.jsonl (docs/results.md, needle in real text).
"""

from ml_collections import config_dict

LAUNCHER = "experiments.evaluate"


def get_config():
  """n=3 per cell: a first look at which needle formats the full cache retrieves."""
  c = config_dict.ConfigDict()
  c.method = "knorm"
  c.ratio = "0.5"
  c.haystack = "docs,code,license,changelog"
  c.needle = "number,pin,word,uuid,phrase"
  c.lengths = "1024"
  c.num_samples = 3
  c.out = "results/eval_haystacks_needles_1k.jsonl"
  return c
