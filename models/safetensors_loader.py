"""Loads an HF checkpoint directory: ``config.json`` + one or many ``*.safetensors``."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from kvlab.models.config import ModelConfig, from_hf_config
from kvlab.models.weights import build_params, expected_hf_names


class CheckpointError(ValueError):
  """A checkpoint file is missing, truncated or inconsistent."""


def read_hf_config(path: str) -> dict:
  """The parsed ``config.json`` of the HF checkpoint directory ``path``.

  Raises CheckpointError when it is missing or not valid JSON."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise CheckpointError(f"no config.json in {path!r}: point --model at an HF checkpoint "
                          "directory (config.json + *.safetensors) or a .gguf file")
  try:
    with open(cfg_path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-download the checkpoint") from e


def _weight_files(path: str) -> dict[str, str]:
  """Tensor name -> file, from ``model.safetensors.index.json`` or by scanning the shards."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
    for fn in files:
      if not os.path.isfile(os.path.join(path, fn)):
        raise CheckpointError(f"shard {fn} listed in {index} is missing; re-download the "
                              "checkpoint")
    return {k: os.path.join(path, v) for k, v in weight_map.items()}
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise CheckpointError(f"no *.safetensors files in {path!r} (kvlab does not read .bin/.pt "
                          "checkpoints: convert with transformers' save_pretrained)")
  out = {}
  for fn in files:
    full = os.path.join(path, fn)
    with _open(full) as f:
      for k in f.keys():
        out[k] = full
  return out


# Where multimodal checkpoints (Gemma3ForConditionalGeneration) keep the text decoder: stored
# prefix -> the causal LM's ``model.`` (transformers 5 writes the first, 4.x the second).
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.")


def _text_decoder_names(files: dict[str, str]) -> dict[str, str]:
  """HF causal-LM tensor name -> stored name: the identity, or for a multimodal checkpoint its
  text decoder's tensors under the causal LM's names (vision tower tensors are left out)."""
  if "model.embed_tokens.weight" in files:
    return {k: k for k in files}
  for prefix in _TEXT_PREFIXES:
    if prefix + "embed_tokens.weight" in files:
      out = {"model." + k[len(prefix):]: k for k in files if k.startswith(prefix)}
      for head in ("lm_head.weight", "language_model.lm_head.weight"):
        if head in files:
          out["lm_head.weight"] = head
      return out
  return {k: k for k in files}


def _open(file: str):
  try:
    return safe_open(file, framework="numpy")
  except Exception as e:  # safetensors raises its own error types for bad headers
    raise CheckpointError(f"cannot read {file}: {e}. The file is truncated or corrupt; "
                          "re-download it") from e


def load_safetensors_dir(path: str, dtype=jnp.float32, progress: bool = True
                         ) -> tuple[ModelConfig, dict]:
  """Returns ``(config, params)`` for an HF checkpoint directory, weights cast to ``dtype``."""
  cfg = from_hf_config(read_hf_config(path))
  files = _weight_files(path)
  stored = _text_decoder_names(files)
  # transformers drops lm_head.weight when embeddings are tied; some exports keep it.
  missing = [n for n in expected_hf_names(cfg) if n not in stored]
  if missing:
    raise CheckpointError(f"{len(missing)} tensors missing from {path!r}, e.g. {missing[:3]}; "
                          "the checkpoint is incomplete or not a supported architecture")
  handles: dict[str, object] = {}

  def get(name: str) -> np.ndarray:
    name = stored[name]
    fn = files[name]
    if fn not in handles:
      handles[fn] = _open(fn)
    try:
      return handles[fn].get_tensor(name)
    except Exception as e:
      raise CheckpointError(f"cannot read tensor {name} from {fn}: {e}. The file is truncated "
                            "or corrupt; re-download it") from e

  params = build_params(cfg, get, dtype, source=os.path.basename(os.path.normpath(path)),
                        progress=progress)
  return cfg, params
