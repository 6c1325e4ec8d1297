"""Needle 1k (n=20) at ratio 1.0 for the quantizers and structural caches: KIVI 2 / 4-bit here;
--config.method=kvquant2,kvquant,kvquant4 (or think, xkv, matryoshka,...) for the other rows.

Reproduces results/eval_kivi_niah_1k.jsonl (docs/results.md, "KIVI needle", "KVQuant needle",
ThinK, xKV, low-rank rows).
"""

from ml_collections import config_dict

LAUNCHER = "experiments.evaluate"


def get_config():
  """niah_single, 1k tokens, 20 samples, the whole cache kept and compressed."""
  c = config_dict.ConfigDict()
  c.method = "kivi,kivi4"
  c.ratio = "1.0"
  c.lengths = "1024"
  c.num_samples = 20
  c.out = "results/eval_kivi_niah_1k.jsonl"
  return c
