"""A model's architecture and tokenizer with seeded random weights, as an HF checkpoint directory
(its launcher, with the why: ``experiments/random_twin.py``)."""

from __future__ import annotations

import json
import os


def write_config(model: str, out: str) -> None:
  """Writes ``model``'s transformers config and its tokenizer (kvlab's reading of the GGUF
  vocabulary, saved as ``tokenizer.json`` + ``tokenizer_config.json``) into ``out``."""
  import transformers  # pylint: disable=g-import-not-at-top
  from kvlab.models import registry  # pylint: disable=g-import-not-at-top
  from kvlab.models.gguf_loader import open_gguf  # pylint: disable=g-import-not-at-top
  from kvlab.models.tokenizer import from_gguf  # pylint: disable=g-import-not-at-top

  kind, path = registry.resolve(model)
  if kind != "gguf":
    raise ValueError(f"{model!r} is already an HF directory ({path}): copy its config.json and "
                     "tokenizer files instead")
  os.makedirs(out, exist_ok=True)
  cfg = transformers.AutoConfig.from_pretrained(os.path.dirname(path),
                                                gguf_file=os.path.basename(path))
  cfg.save_pretrained(out)
  tok = from_gguf(open_gguf(path))
  tok._tok.save(os.path.join(out, "tokenizer.json"))  # pylint: disable=protected-access
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": tok.bos_token, "eos_token": tok.eos_token,
               "add_bos_token": tok.add_bos, "chat_template": tok.chat_template}, f, indent=1)
  print(f"wrote config and tokenizer of {model} to {out}")


def write_weights(out: str, seed: int = 0) -> None:
  """Writes seeded random weights (transformers' own initialisation of the config in ``out``)
  as ``out/model.safetensors``."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  cfg = transformers.AutoConfig.from_pretrained(out)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
  model.save_pretrained(out, safe_serialization=True)
  n = sum(p.numel() for p in model.parameters())
  print(f"wrote {n / 1e6:.1f} M random parameters (seed {seed}) to {out}")
