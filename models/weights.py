"""HF-named tensors -> kvlab's stacked parameter tree.

Both loaders (safetensors directory, GGUF) first present tensors under their HF names
(``model.layers.3.self_attn.q_proj.weight``, shape ``[out, in]``); this module transposes them
to ``[in, out]`` and stacks layers on a leading axis, matching ``models.decoder.Decoder``.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np
from kvlab.lib.progress import tqdm

from kvlab.models.config import ModelConfig

# kvlab layer param -> (HF suffix under model.layers.{i}., transpose?)
_LAYER_MAP = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "bo": ("self_attn.o_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
    "b_gate": ("mlp.gate_proj.bias", False),
    "b_up": ("mlp.up_proj.bias", False),
    "b_down": ("mlp.down_proj.bias", False),
}

# Gemma 3's four norms per layer ("sandwich"): the norm before the MLP has its own name, and
# HF's post_attention_layernorm is the norm *after* attention (Llama's is the one before the MLP).
_SANDWICH_MAP = {
    "mlp_norm": ("pre_feedforward_layernorm.weight", False),
    "post_attn_norm": ("post_attention_layernorm.weight", False),
    "post_mlp_norm": ("post_feedforward_layernorm.weight", False),
}


def layer_map(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
  """kvlab layer param -> (HF suffix under ``model.layers.{i}.``, transpose?) for ``cfg``."""
  return {**_LAYER_MAP, **_SANDWICH_MAP} if cfg.sandwich_norms else dict(_LAYER_MAP)


def layer_param_names(cfg: ModelConfig) -> list[str]:
  """Names of the per-layer parameters of ``cfg`` (biases and q/k norms only where it has them)."""
  names = ["attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down"]
  if cfg.qkv_bias:
    names += ["bq", "bk", "bv"]
  if cfg.o_bias:
    names += ["bo"]
  if cfg.qk_norm:
    names += ["q_norm", "k_norm"]
  if cfg.mlp_bias:
    names += ["b_gate", "b_up", "b_down"]
  if cfg.sandwich_norms:
    names += ["post_attn_norm", "post_mlp_norm"]
  return names


def expected_hf_names(cfg: ModelConfig) -> list[str]:
  """Every HF tensor name the config needs (used to report missing tensors up front)."""
  names = ["model.embed_tokens.weight", "model.norm.weight"]
  if not cfg.tie_word_embeddings:
    names.append("lm_head.weight")
  lmap = layer_map(cfg)
  for i in range(cfg.num_layers):
    names += [f"model.layers.{i}.{lmap[n][0]}" for n in layer_param_names(cfg)]
  return names


def build_params(cfg: ModelConfig, get: Callable[[str], np.ndarray], dtype=jnp.float32,
                 source: str = "checkpoint", progress: bool = True) -> dict:
  """Reads every tensor through ``get(hf_name) -> np.ndarray [out, in]`` into the param tree.

  Returns ``{"embed": [V, D], "final_norm": [D], "lm_head"?: [D, V], "layers": {name: [L, ...]}}``.
  """
  np_dtype = jnp.dtype(dtype)

  def fetch(name, transpose):
    x = np.asarray(get(name))
    return (x.T if transpose else x).astype(np_dtype)

  layers = {}
  names = layer_param_names(cfg)
  lmap = layer_map(cfg)
  it = tqdm(range(cfg.num_layers), desc=f"loading {source}", disable=not progress, leave=False)
  for i in it:
    for n in names:
      suffix, tr = lmap[n]
      x = fetch(f"model.layers.{i}.{suffix}", tr)
      if n not in layers:
        layers[n] = np.empty((cfg.num_layers,) + x.shape, np_dtype)
      layers[n][i] = x
  params = {
      "embed": jnp.asarray(fetch("model.embed_tokens.weight", False)),
      "final_norm": jnp.asarray(fetch("model.norm.weight", False)),
      "layers": {n: jnp.asarray(v) for n, v in layers.items()},
  }
  if not cfg.tie_word_embeddings:
    params["lm_head"] = jnp.asarray(fetch("lm_head.weight", True))
  _check_shapes(cfg, params)
  return params


def _check_shapes(cfg: ModelConfig, params: dict):
  d, h = cfg.hidden_size, cfg.head_dim
  want = {
      "wq": (d, cfg.num_heads * h), "wk": (d, cfg.num_kv_heads * h),
      "wv": (d, cfg.num_kv_heads * h), "wo": (cfg.num_heads * h, d),
      "w_gate": (d, cfg.intermediate_size), "w_down": (cfg.intermediate_size, d),
  }
  for n, shape in want.items():
    got = params["layers"][n].shape[1:]
    if got != shape:
      raise ValueError(f"checkpoint tensor {n} has shape {got}, config expects {shape}: the "
                       "config does not describe these weights (wrong config.json?)")
  if params["embed"].shape != (cfg.vocab_size, d):
    raise ValueError(f"embedding has shape {params['embed'].shape}, config expects "
                     f"{(cfg.vocab_size, d)}")
