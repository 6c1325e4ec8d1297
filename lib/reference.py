"""transformers (PyTorch) reference models for parity checks and benchmarks (dev extra only)."""

from __future__ import annotations

import os


def load_hf_reference(path: str):
  """Loads the same checkpoint in transformers, fp32, eager attention; ``path`` is an HF
  directory or a ``.gguf`` file (dequantized by transformers through the ``gguf`` package)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the transformers reference needs the dev extra: "
                      "pip install -e '.[dev]'") from e
  kw = dict(dtype=torch.float32, attn_implementation="eager")
  if path.endswith(".gguf"):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), **kw).eval()
  return transformers.AutoModelForCausalLM.from_pretrained(path, **kw).eval()
