"""KV-head compression of the default model, 3 -> 1 kv heads folded into the weights, no LoRA.

Reproduces results/kv_heads_smollm2.json (docs/results.md, "KV-head compression");
--config.kv_heads=3 is the exact 3 -> 3 check.
"""

from ml_collections import config_dict

LAUNCHER = "experiments.compress_kv_heads"


def get_config():
  """4 calibration samples x 512 tokens; perplexity over 4 x 256 tokens after 512."""
  c = config_dict.ConfigDict()
  c.kv_heads = 1
  c.num_samples = 4
  c.seqlen = 512
  c.eval_samples = 4
  c.eval_tokens = 512
  c.out = "results/kv_heads_smollm2.json"
  return c
