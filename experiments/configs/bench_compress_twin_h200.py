"""Compression overhead / prefill at 4k on a GPU, bf16, on the default model's random twin, with
the fused column-sum kernels, best of 10.

Reproduces results/bench_compress_twin_bf16_kernel_h200.json (docs/results.md, GPU "compression
overhead"); --config.method=h2o,keyformer --config.column_sums=kept (or own) for the
_kept / _ownpass files. The twin: see vs_kvpress_twin_h200.py.
"""

from ml_collections import config_dict

LAUNCHER = "experiments.bench_compress"


def get_config():
  """9 prefill methods on the twin, column sums by the kernel."""
  c = config_dict.ConfigDict()
  c.model = ".devcarry/smollm2-twin"
  c.method = ("h2o,keyformer,tova,snapkv,pyramidkv,adakv,knorm,streaming_llm,"
              "expected_attention")
  c.length = 4096
  c.reps = 10
  c.dtype = "bfloat16"
  c.column_sums = "kernel"
  return c
