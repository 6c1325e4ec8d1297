"""Gemma 3 (text decoder) hyper-parameters from HF ``config.json`` and from GGUF metadata.

Gemma 3 runs on ``models.decoder.Decoder`` with these ``ModelConfig`` switches: RMSNorms that
scale by ``1 + w`` (``norm_offset=1``), per-head q/k norms, norms before and after both attention
and the MLP (``sandwich_norms``), a GeGLU MLP with tanh GELU, embeddings times ``sqrt(D)``,
attention logits scaled by ``query_pre_attn_scalar ** -0.5``, tied embeddings, optional final
logit softcapping, and interleaved layer kinds (``layer_types``): LOCAL layers attend to a
sliding window with their own RoPE base (``rope_local``, 10k), GLOBAL layers to everything with
``rope`` (``rope_theta``, 1M, plus ``rope_scaling`` when given: it applies to GLOBAL layers only).
"""

from __future__ import annotations

from typing import Any, Mapping

from kvlab.lib.rope import RopeConfig
from kvlab.models.config import GLOBAL, LOCAL, ModelConfig, _eos_tuple, rope_from_hf

# transformers' defaults for Gemma3TextConfig, used where a config.json leaves a field out.
_LOCAL_BASE = 10000.0
_GLOBAL_BASE = 1000000.0
_PATTERN = 6  # every 6th layer is GLOBAL
_HF_LAYER_KIND = {"sliding_attention": LOCAL, "full_attention": GLOBAL}


def pattern_types(num_layers: int, pattern: int) -> tuple[str, ...]:
  """``sliding_window_pattern`` -> layer kinds: layer ``i`` is GLOBAL when ``(i + 1) % pattern
  == 0``, LOCAL otherwise (``pattern=6``: five local layers, then a global one)."""
  if pattern < 1:
    raise ValueError(f"sliding_window_pattern must be >= 1, got {pattern}")
  return tuple(GLOBAL if (i + 1) % pattern == 0 else LOCAL for i in range(num_layers))


def _rope_pair(cfg: Mapping[str, Any], head_dim: int) -> tuple[RopeConfig, RopeConfig]:
  """``(global rope, local rope)`` from either transformers 5's ``rope_parameters`` (one dict
  per layer kind) or the older ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling``."""
  params = cfg.get("rope_parameters") or {}
  max_pos = cfg.get("max_position_embeddings", 131072)
  if "full_attention" in params or "sliding_attention" in params:
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
    full.setdefault("rope_theta", cfg.get("rope_theta") or _GLOBAL_BASE)
    local.setdefault("rope_theta", cfg.get("rope_local_base_freq") or _LOCAL_BASE)
    glob = rope_from_hf({"rope_parameters": full, "rope_theta": full["rope_theta"],
                         "max_position_embeddings": max_pos}, head_dim)
    loc = rope_from_hf({"rope_parameters": local, "rope_theta": local["rope_theta"],
                        "max_position_embeddings": max_pos}, head_dim)
    return glob, loc
  glob = rope_from_hf({"rope_theta": cfg.get("rope_theta") or _GLOBAL_BASE,
                       "rope_scaling": cfg.get("rope_scaling"),
                       "max_position_embeddings": max_pos}, head_dim)
  loc = RopeConfig(head_dim=head_dim, theta=float(cfg.get("rope_local_base_freq")
                                                   or _LOCAL_BASE))
  return glob, loc


def gemma3_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
  """ModelConfig of a Gemma 3 text decoder from a parsed ``config.json``: model_type
  ``gemma3_text`` (``Gemma3ForCausalLM``), or ``gemma3`` whose ``text_config`` is used."""
  if cfg.get("model_type") == "gemma3":
    text = cfg.get("text_config")
    if not isinstance(text, Mapping):
      raise ValueError("gemma3 config.json has no text_config: kvlab reads the text decoder of "
                       "Gemma 3 and needs its hyper-parameters there")
    cfg = {**text, "model_type": "gemma3_text"}
  if cfg.get("attn_logit_softcapping") is not None:
    raise ValueError("attn_logit_softcapping is set in config.json; Gemma 3 checkpoints have none "
                     "and kvlab does not implement it (Gemma 2 style): remove it or use another "
                     "implementation")
  if cfg.get("use_bidirectional_attention"):
    raise ValueError("use_bidirectional_attention=true (an encoder variant) is not supported: "
                     "kvlab decodes causally")
  act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
  if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
    raise ValueError(f"Gemma 3 hidden_activation {act!r} is not supported (kvlab implements "
                     "gelu_pytorch_tanh, the released checkpoints' activation)")
  n = int(cfg.get("num_attention_heads", 8))
  d = int(cfg["hidden_size"])
  head_dim = int(cfg.get("head_dim") or 256)
  num_layers = int(cfg["num_hidden_layers"])
  kinds = cfg.get("layer_types")
  if kinds:
    unknown = set(kinds) - set(_HF_LAYER_KIND)
    if unknown:
      raise ValueError(f"unknown layer_types {sorted(unknown)} in config.json (kvlab knows "
                       f"{sorted(_HF_LAYER_KIND)})")
    layer_types = tuple(_HF_LAYER_KIND[k] for k in kinds)
  else:
    pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or _PATTERN
    layer_types = pattern_types(num_layers, int(pattern))
  glob, loc = _rope_pair(cfg, head_dim)
  softcap = cfg.get("final_logit_softcapping")
  return ModelConfig(
      family="gemma3",
      vocab_size=int(cfg["vocab_size"]),
      hidden_size=d,
      intermediate_size=int(cfg["intermediate_size"]),
      num_layers=num_layers,
      num_heads=n,
      num_kv_heads=int(cfg.get("num_key_value_heads") or n),
      head_dim=head_dim,
      rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      rope=glob,
      max_position_embeddings=int(cfg.get("max_position_embeddings", 131072)),
      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
      qkv_bias=bool(cfg.get("attention_bias", False)),
      o_bias=bool(cfg.get("attention_bias", False)),
      qk_norm=True,
      sliding_window=int(cfg.get("sliding_window") or 4096),
      bos_token_id=cfg.get("bos_token_id", 2),
      eos_token_ids=_eos_tuple(cfg.get("eos_token_id", 1)),
      norm_offset=1.0,
      sandwich_norms=True,
      mlp_act="gelu_tanh",
      embed_scale=True,
      query_scale=float(cfg.get("query_pre_attn_scalar") or 256) ** -0.5,
      final_logit_softcap=float(softcap) if softcap else None,
      layer_types=layer_types,
      rope_local=loc,
  )


def gemma3_gguf_fields(g) -> dict:
  """The Gemma 3 specific ModelConfig fields from GGUF metadata (``g(key, default=None)`` reads
  ``gemma3.<key>``). llama.cpp's file leaves out what its runtime hard-codes for Gemma 3, and
  we follow the runtime:

  * the LOCAL layers' RoPE base is 10000 (``rope.freq_base`` is the GLOBAL layers'), and
    ``rope.scaling`` (linear) applies to GLOBAL layers only;
  * every 6th layer is GLOBAL unless the file has ``attention.sliding_window_pattern``
    (one bool per layer, true = sliding);
  * the query scale is ``head_dim ** -0.5``, except for the 62-layer 27B model where it is
    ``(D / N) ** -0.5`` (HF's ``query_pre_attn_scalar`` = 168);
  * ``final_logit_softcapping`` only when the file has it.
  """
  num_layers = int(g("block_count"))
  n = int(g("attention.head_count"))
  d = int(g("embedding_length"))
  head_dim = int(g("attention.key_length", 256))
  swa = g("attention.sliding_window_pattern")
  if isinstance(swa, (list, tuple)) and len(swa) == num_layers:
    layer_types = tuple(LOCAL if bool(x) else GLOBAL for x in swa)
  else:
    layer_types = pattern_types(num_layers, int(swa) if isinstance(swa, int) and swa else
                                _PATTERN)
  scalar = d / n if num_layers == 62 else head_dim
  softcap = g("final_logit_softcapping")
  local_base = g("rope.freq_base_swa", _LOCAL_BASE)
  return dict(
      norm_offset=1.0, sandwich_norms=True, mlp_act="gelu_tanh", embed_scale=True,
      query_scale=float(scalar) ** -0.5,
      final_logit_softcap=float(softcap) if softcap else None,
      layer_types=layer_types,
      rope_local=RopeConfig(head_dim=head_dim, theta=float(local_base)),
      sliding_window=int(g("attention.sliding_window", 4096)),
  )
