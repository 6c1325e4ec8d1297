"""Issue 3's needle leaderboard (n=100): the 9 prefill-only scorers at 25 / 50 / 75 % kept.

  python -m experiments.evaluate --config=experiments/configs/niah_n100_prefill.py
  ... --config.lengths=2048 --config.out=results/eval_niah_2k_n100.jsonl   (4k: 4096, _4k_)

Reproduces results/eval_niah_1k_n100.jsonl (docs/results.md, "needle ... 1k ... n=100").
"""

from ml_collections import config_dict

LAUNCHER = "experiments.evaluate"


def get_config():
  """niah_single, query-agnostic, 1k tokens, 100 samples, every ratio of the default."""
  c = config_dict.ConfigDict()
  c.method = ("snapkv,streaming_llm,knorm,tova,h2o,pyramidkv,adakv,expected_attention,"
              "keyformer")
  c.lengths = "1024"
  c.num_samples = 100
  c.out = "results/eval_niah_1k_n100.jsonl"
  return c
