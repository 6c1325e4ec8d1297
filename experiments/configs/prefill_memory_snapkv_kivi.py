"""One 8191-token prefill with snapkv+kivi at 25 %, compressed during prefill and packed after
every chunk (keys staged at 8 bits, the default); --config.method=snapkv+kivi:prefill_key_bits=2
for the 2-bit staging.

Reproduces the README's "peak cache 56.6 MB, final 14.9 MB" row
(results/bench_online_memory_quant_keybits_cpu.json, docs/results.md).
"""

from ml_collections import config_dict

LAUNCHER = "experiments.prefill_memory"


def get_config():
  """Peak cache bytes and peak resident memory of that prefill, as one JSON line."""
  c = config_dict.ConfigDict()
  c.length = 8191
  c.ratio = 0.25
  c.method = "snapkv+kivi"
  c.compress_during_prefill = True
  c.quantize_each_chunk = True
  return c
