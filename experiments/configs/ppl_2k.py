"""Perplexity of 256 tokens after a 2k real-text prefix (n=20): quantizers, xKV, ThinK,
MiniCache and MatryoshkaKV at ratio 1.0.

Reproduces results/eval_kivi_ppl_2k.jsonl (docs/results.md, KIVI / KVQuant / xKV / ThinK /
low-rank perplexity rows). Its eviction rows: --config.method=snapkv,tova,streaming_llm,adakv,
pyramidkv --config.ratio=0.25,0.5.
"""

from ml_collections import config_dict

LAUNCHER = "experiments.evaluate"


def get_config():
  """One run for every ratio-1.0 row of the perplexity task."""
  c = config_dict.ConfigDict()
  c.task = "perplexity"
  c.method = ("kivi,kivi4,snapkv+kivi,kvquant2,kvquant,kvquant4,xkv,think,minicache,"
              "minicache:start=0,matryoshka_pca,matryoshka,matryoshka:searched=true")
  c.ratio = "1.0"
  c.lengths = "2048"
  c.num_samples = 20
  c.continuation = 256
  c.out = "results/eval_kivi_ppl_2k.jsonl"
  return c
