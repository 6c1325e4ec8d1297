"""Writes a model as an HF checkpoint directory (``config.json`` + ``model.safetensors`` +
tokenizer files) that ``models.load`` reads back: the inverse of ``models.safetensors_loader``.

Used to save a converted model (``lib.lowrank.kv_heads``: fewer kv heads) so that
``--model=DIR`` loads it like any other checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np

from kvlab.models.config import from_hf_config
from kvlab.models.weights import _LAYER_MAP, layer_param_names  # pylint: disable=protected-access

# HF model_type -> architectures entry of config.json
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json")


def hf_config(config) -> dict:
  """The HF ``config.json`` dict that ``models.config.from_hf_config`` reads back as ``config``."""
  c = config
  if c.family not in _ARCHITECTURES:
    raise ValueError(f"cannot write an HF config for family {c.family!r}")
  if c.family == "qwen2":
    if not c.qkv_bias or c.o_bias:
      raise ValueError("qwen2 checkpoints have q/k/v biases and no o_proj bias; this config "
                       "cannot be written as one")
    attention_bias = False
  else:
    if c.qkv_bias != c.o_bias:
      raise ValueError(f"{c.family} config.json has one attention_bias for q/k/v/o; this model has "
                       f"qkv_bias={c.qkv_bias}, o_bias={c.o_bias}")
    attention_bias = c.qkv_bias
  out = {
      "architectures": [_ARCHITECTURES[c.family]], "model_type": c.family,
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
      "max_position_embeddings": c.max_position_embeddings,
      "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": attention_bias,
      "mlp_bias": c.mlp_bias, "bos_token_id": c.bos_token_id,
      "eos_token_id": list(c.eos_token_ids) or None, "torch_dtype": "float32",
  }
  if c.rope is not None:
    out["rope_theta"] = c.rope.theta
    if c.rope.rope_type != "default":
      out["rope_scaling"] = {
          "rope_type": c.rope.rope_type, "factor": c.rope.factor,
          "low_freq_factor": c.rope.low_freq_factor, "high_freq_factor": c.rope.high_freq_factor,
          "original_max_position_embeddings": c.rope.original_max_position}
  if c.family == "mistral":
    out["sliding_window"] = c.sliding_window
  elif c.family in ("qwen2", "qwen3"):
    out["use_sliding_window"] = False
  return out


def hf_tensors(config, params: dict) -> dict[str, np.ndarray]:
  """Params -> HF-named float32 tensors ``[out, in]`` (the inverse of ``models.weights``)."""
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  out = {"model.embed_tokens.weight": f32(params["embed"]),
         "model.norm.weight": f32(params["final_norm"])}
  if not config.tie_word_embeddings:
    out["lm_head.weight"] = f32(np.asarray(params["lm_head"]).T)
  for name in layer_param_names(config):
    suffix, transpose = _LAYER_MAP[name]
    stacked = np.asarray(params["layers"][name])
    for i in range(config.num_layers):
      out[f"model.layers.{i}.{suffix}"] = f32(stacked[i].T if transpose else stacked[i])
  return out


def _comparable(config):
  """``config`` with the RoPE fields that its type does not use cleared."""
  r = config.rope
  if r is not None and r.rope_type in ("default", "linear"):
    r = dataclasses.replace(r, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=0,
                            factor=r.factor if r.rope_type == "linear" else 1.0)
  return dataclasses.replace(config, rope=r)


def save_converted(model, path: str, *, tokenizer=None, source: str = "") -> str:
  """Writes ``path/`` as an HF checkpoint (config.json + model.safetensors + tokenizer files).

  Args:
    model: a ``models.LanguageModel`` (its tokenizer and source are used) or a
      ``(config, params)`` pair.
    path: output directory (created).
    tokenizer: a ``models.tokenizer.Tokenizer`` to write when ``model`` is a pair.
    source: the original checkpoint, when ``model`` is a pair.

  Tokenizer files of an HF-directory source are copied as they are. For any other source (a
  GGUF file) the in-memory tokenizer is written as ``tokenizer.json`` plus a
  ``tokenizer_config.json`` with its BOS/EOS tokens, ``add_bos_token`` and chat template, which
  ``models.tokenizer.from_hf_dir`` reads back. Weights are stored in float32.

  Returns:
    ``path``.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if isinstance(model, tuple):
    config, params = model
  else:
    config, params = model.config, model.params
    tokenizer, source = model.tokenizer, model.source
  hf = hf_config(config)
  back = from_hf_config(hf)
  if _comparable(back) != _comparable(config):
    raise ValueError(f"config.json would not read back as this model's config:\n{back}\n"
                     f"!=\n{config}")
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  save_file(hf_tensors(config, params), os.path.join(path, "model.safetensors"),
            metadata={"format": "pt"})
  copied = False
  if source and os.path.isdir(source):
    for fn in _TOKENIZER_FILES:
      if os.path.isfile(os.path.join(source, fn)):
        shutil.copy(os.path.join(source, fn), os.path.join(path, fn))
        copied = copied or fn == "tokenizer.json"
  if tokenizer is not None and not copied and hasattr(tokenizer, "_tok"):
    tokenizer._tok.save(os.path.join(path, "tokenizer.json"))  # pylint: disable=protected-access
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump({"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
                 "add_bos_token": tokenizer.add_bos, "chat_template": tokenizer.chat_template},
                f, indent=2)
  return path
