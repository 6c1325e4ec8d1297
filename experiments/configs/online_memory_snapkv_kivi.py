"""Peak cache of an 8191-token prompt at 25 %, snapkv+kivi: after prefill / during prefill,
packed at the end / packed after every chunk; no address-space demo.

Reproduces results/bench_online_memory_quant_cpu.json (docs/results.md, "peak cache, 8191-token
prompt, 25 % budget, snapkv+kivi").
"""

from ml_collections import config_dict

LAUNCHER = "experiments.bench_online_memory"


def get_config():
  """snapkv+kivi in its three prefill modes, each in a fresh process."""
  c = config_dict.ConfigDict()
  c.length = 8192
  c.ratio = 0.25
  c.method = "snapkv+kivi"
  c.limit_gib = 0.0
  c.out = "results/bench_online_memory_quant_cpu.json"
  return c
