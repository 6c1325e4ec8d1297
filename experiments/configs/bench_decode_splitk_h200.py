"""KIVI decode kernel on a GPU: split-K partitions (auto, 1) x fp32 / bf16 dots, batch 1, 1k /
4k / 32k, best of 10.

Reproduces results/bench_decode_splitk_h200.json (docs/results.md, "KIVI decode kernel,
split-K and bf16 dots").
"""

from ml_collections import config_dict

LAUNCHER = "experiments.bench_decode"


def get_config():
  """Every kernel variant beside the bf16 full and XLA paths."""
  c = config_dict.ConfigDict()
  c.lengths = "1024,4096,32768"
  c.reps = 10
  c.kernel_partitions = "auto,1"
  c.kernel_dot_dtypes = "float32,bfloat16"
  return c
