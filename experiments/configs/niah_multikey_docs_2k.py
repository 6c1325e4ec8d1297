"""A harder needle: multi-key in the stdlib-docs haystack, 2k, n=30, 25 / 50 % kept.

Reproduces results/eval_niah_multikey_docs_2k_kvzip_heads.jsonl (docs/results.md, "a harder
needle"; the README's real-text figures).
"""

from ml_collections import config_dict

LAUNCHER = "experiments.evaluate"


def get_config():
  """kvzip_heads, kvzip and tova on niah_multikey over the docs haystack."""
  c = config_dict.ConfigDict()
  c.method = "kvzip_heads,kvzip,tova"
  c.ratio = "0.25,0.5"
  c.task = "niah_multikey"
  c.haystack = "docs"
  c.lengths = "2048"
  c.num_samples = 30
  c.out = "results/eval_niah_multikey_docs_2k_kvzip_heads.jsonl"
  return c
