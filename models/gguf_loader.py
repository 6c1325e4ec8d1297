"""Loads a GGUF file (llama.cpp format): config from metadata, weights dequantized with ``gguf``.

llama.cpp's converter permutes the rows of the Llama q/k projections to its interleaved RoPE
layout (pairs ``(2i, 2i+1)`` instead of HF's halves ``(i, i + H/2)``); we undo it on load so the
weights match HF and our rotate-half RoPE. Qwen2/Qwen3 GGUFs are not permuted.

Gemma 3 (``general.architecture = gemma3``) differs from HF in four ways, all undone or
supplied here (checked against llama.cpp's ``convert_hf_to_gguf.py``, class ``Gemma3Model``,
whose ``norm_shift`` is 1.0, and against transformers' GGUF loader, which subtracts 1 from
Gemma norms the same way; the tiny round-trip test writes a GGUF with the +1 and reloads it):

* every ``*norm.weight`` (the four per-layer norms, q/k norms, the final norm) is stored as
  ``1 + w``: llama.cpp's RMSNorm multiplies by the stored weight, HF's Gemma norm by ``1 + w``.
  We subtract 1 so params follow HF (``norm_offset = 1`` adds it back, in float32);
* tensor names: ``ffn_norm`` is the norm *before* the MLP (HF ``pre_feedforward_layernorm``; for
  Llama it is ``post_attention_layernorm``), ``post_attention_norm`` and ``post_ffw_norm`` are the
  norms after attention and after the MLP;
* q/k rows are *not* permuted (llama.cpp runs Gemma with NEOX, i.e. rotate-half, RoPE);
* metadata leaves out what llama.cpp's runtime hard-codes: the local RoPE base (10000), the
  local/global pattern (every 6th layer global), the query scale (``head_dim ** -0.5``; 27B:
  ``(D / N) ** -0.5``); ``models.gemma3.gemma3_gguf_fields`` fills them in. The embedding is
  stored unscaled (the runtime multiplies by ``sqrt(D)``, as HF does).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from kvlab.lib.rope import RopeConfig
from kvlab.models.config import ModelConfig
from kvlab.models.safetensors_loader import CheckpointError
from kvlab.models.weights import build_params

_GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}

# GGUF tensor name (after "blk.{i}.") -> HF suffix (after "model.layers.{i}.")
_BLK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
# Gemma 3's block names where they differ from _BLK (see the module docstring).
_BLK_GEMMA3 = {
    **_BLK,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
# Added to every norm weight by llama.cpp's converter, per architecture (subtracted on load).
NORM_SHIFT = {"gemma3": 1.0}


def open_gguf(path: str):
  """Opens a GGUF file (``models.gguf_reader.GGUFFile``: ``fields``, ``tensors`` as
  ``gguf.GGUFReader`` has them, parsed ~100x faster) with a clear error for missing, truncated or
  corrupt files."""
  from kvlab.models.gguf_reader import GGUFFile  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    raise CheckpointError(f"GGUF file not found: {path!r}")
  try:
    reader = GGUFFile(path)
  except Exception as e:
    raise CheckpointError(f"cannot read GGUF file {path!r}: {type(e).__name__}: {e}. The file is "
                          "truncated or corrupt; re-download or re-install it") from e
  size = os.path.getsize(path)
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size:
      raise CheckpointError(f"GGUF file {path!r} is truncated: tensor {t.name} ends at byte "
                            f"{t.data_offset + t.n_bytes} but the file has {size}; re-download it")
  return reader


def field(reader, key, default=None):
  """The decoded value of GGUF metadata field ``key``, or ``default`` when the file lacks it
  (``reader``: a ``GGUFFile`` from ``open_gguf`` or a ``gguf.GGUFReader``)."""
  f = reader.fields.get(key)
  if f is None:
    return default
  return f.contents()


def config_from_gguf(reader) -> ModelConfig:
  """ModelConfig from GGUF metadata (``{arch}.block_count`` etc.)."""
  arch = field(reader, "general.architecture")
  if arch not in _GGUF_ARCHS:
    raise ValueError(f"unknown architecture in GGUF: general.architecture={arch!r}; kvlab "
                     f"supports {sorted(_GGUF_ARCHS)}")
  g = lambda k, d=None: field(reader, f"{arch}.{k}", d)
  n = int(g("attention.head_count"))
  d = int(g("embedding_length"))
  head_dim = int(g("attention.key_length", d // n))
  names = {t.name for t in reader.tensors}
  scaling_type = g("rope.scaling.type", "none")
  rope_type = {"none": "default", "linear": "linear"}.get(scaling_type)
  if rope_type is None:
    raise ValueError(f"GGUF rope.scaling.type={scaling_type!r} is not supported from GGUF "
                     "metadata (kvlab reads none/linear there); load the model's HF directory, "
                     "whose config.json rope_scaling kvlab reads (yarn, longrope, llama3, ...)")
  vocab = g("vocab_size") or len(field(reader, "tokenizer.ggml.tokens"))
  eos = field(reader, "tokenizer.ggml.eos_token_id")
  eot = field(reader, "tokenizer.ggml.eot_token_id")
  eos_ids = tuple(int(x) for x in (eos, eot) if x is not None)
  extra = {}
  if arch == "gemma3":
    from kvlab.models.gemma3 import gemma3_gguf_fields  # pylint: disable=g-import-not-at-top
    extra = gemma3_gguf_fields(g)
  return ModelConfig(
      family=_GGUF_ARCHS[arch],
      vocab_size=int(vocab),
      hidden_size=d,
      intermediate_size=int(g("feed_forward_length")),
      num_layers=int(g("block_count")),
      num_heads=n,
      num_kv_heads=int(g("attention.head_count_kv", n)),
      head_dim=head_dim,
      rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
      rope=RopeConfig(head_dim=head_dim, theta=float(g("rope.freq_base", 10000.0)),
                      rope_type=rope_type, factor=float(g("rope.scaling.factor", 1.0))),
      max_position_embeddings=int(g("context_length", 4096)),
      tie_word_embeddings="output.weight" not in names,
      qkv_bias="blk.0.attn_q.bias" in names,
      o_bias="blk.0.attn_output.bias" in names,
      qk_norm="blk.0.attn_q_norm.weight" in names,
      bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_ids=eos_ids,
      **extra,
  )


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k row permutation. ``w [n_head*H, ...]`` -> same shape.

  llama.cpp stores, per head, row ``2i + j`` (j in {0, 1}) from HF row ``i + j*H/2``.
  """
  rows = w.shape[0]
  h = rows // n_head
  return w.reshape(n_head, h // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
  """The transformers tensor name of GGUF tensor ``gguf_name`` (``blk.3.attn_q.weight`` ->
  ``model.layers.3.self_attn.q_proj.weight``) in a file of ``general.architecture = arch``, or
  None for a tensor kvlab does not load."""
  if gguf_name in _TOP:
    return _TOP[gguf_name]
  blk = _BLK_GEMMA3 if arch == "gemma3" else _BLK
  if gguf_name.startswith("blk."):
    _, i, rest = gguf_name.split(".", 2)
    if rest in blk:
      return f"model.layers.{i}.{blk[rest]}"
  return None


def load_gguf(path: str, dtype=jnp.float32, progress: bool = True):
  """Returns ``(config, params, reader)``; weights dequantized (any GGUF quant type) to dtype."""
  from gguf.quants import dequantize  # pylint: disable=g-import-not-at-top

  reader = open_gguf(path)
  cfg = config_from_gguf(reader)
  arch = field(reader, "general.architecture")
  by_hf = {}
  for t in reader.tensors:
    name = hf_name(t.name, arch)
    if name is not None:
      by_hf[name] = t
  permute = cfg.family in ("llama", "mistral")
  shift = NORM_SHIFT.get(arch, 0.0)

  def get(name: str) -> np.ndarray:
    if name not in by_hf:
      raise CheckpointError(f"tensor for {name} missing from GGUF {path!r}; the file is "
                            "incomplete or of an unsupported layout")
    t = by_hf[name]
    try:
      x = dequantize(t.data, t.tensor_type)
    except Exception as e:
      raise CheckpointError(f"cannot dequantize {t.name} ({t.tensor_type.name}) from {path!r}: "
                            f"{e}") from e
    x = np.asarray(x, np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
    if permute and name.endswith("q_proj.weight"):
      x = unpermute_rows(x, cfg.num_heads)
    elif permute and name.endswith("k_proj.weight"):
      x = unpermute_rows(x, cfg.num_kv_heads)
    elif shift and name.endswith("norm.weight"):
      x = x - np.float32(shift)
    return x

  params = build_params(cfg, get, dtype, source=os.path.basename(path), progress=progress)
  return cfg, params, reader
