"""Flax Linen decoder for the Llama family (Llama 2/3.x, Mistral, SmolLM2), Qwen2, Qwen3 and
Gemma 3 (its switches: ``models.gemma3``).

Letters: B batch, T new tokens, D width, F MLP width, N query heads, K kv heads, H head dim,
V vocab, L layers, S cache slots.

Layers are stacked on a leading axis and run under ``nn.scan`` (compile time flat in depth).
The cache is explicit: it goes in and comes out. Inside the layer scan the whole stacked cache
is broadcast and only read (attention slices the blocks it needs at ``[layer]``); the new
keys/values of every layer are appended once after the scan (``KVCache.append``), so no
per-layer copy of the cache is made.

Hybrid models (Gemma 3: ``ModelConfig.layer_types``) scan over per-layer values too: each
layer's sliding window (a LOCAL layer's window; GLOBAL layers get one no distance reaches) and
its RoPE inverse frequencies (``rope_local`` or ``rope``). The window is then a traced scalar in
``chunk_attention``, so one compiled layer serves both kinds.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib.attention import IMPLS, LayerInputs, chunk_attention
from kvlab.lib.cache import KVCache
from kvlab.lib.rope import apply_rope, inv_freq_for
from kvlab.models.config import LOCAL, ModelConfig

_init = nn.initializers.normal(0.02)


# Largest buffer (bytes) the attention may keep for hooks that take its probabilities
# (``[B, K, G, T, S]`` float32 per layer and kind, transient); above it the hooks recompute.
PROBS_MAX_BYTES = 1 << 30

# A GLOBAL layer's window in a hybrid model: larger than any position difference.
NO_WINDOW = 1 << 30


def _fits_probs(q, cache, buffers: int = 1) -> bool:
  """Whether this call's ``buffers`` ``[B, N, T, S]`` probability buffers (plain and/or
  Gumbel) fit ``PROBS_MAX_BYTES`` together."""
  b, t, n, _ = q.shape
  return buffers * b * n * t * cache.capacity * 4 <= PROBS_MAX_BYTES


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
  """RMSNorm of ``x [..., D]`` over the last axis in float32, scaled by ``offset + weight [D]``
  (Gemma: ``offset=1``, added in float32); returns ``x.dtype``."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  w = weight.astype(jnp.float32)
  if offset:
    w = w + jnp.float32(offset)
  return (w * xf).astype(x.dtype)


def _gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU with the tanh approximation (Gemma's ``gelu_pytorch_tanh``), in ``x.dtype``."""
  return jax.nn.gelu(x, approximate=True)


class DecoderLayer(nn.Module):
  """Pre-norm attention + gated MLP (SwiGLU; Gemma 3: GeGLU, and norms after attention and
  after the MLP too). Called under ``nn.scan``; reads the stacked cache at its layer."""

  cfg: ModelConfig
  dtype: Any = jnp.float32
  attn_block_size: int = 512
  observe: Any = None
  attn_impl: str = "xla"

  @nn.compact
  def __call__(self, x, scanned, ctx):
    """x ``[B, T, D]``; scanned ``(layer, probe, project, kind)``: this layer's index, its
    slices of the optional ``probe`` and ``project``, and for a hybrid model ``kind = (window
    [] int32, inv_freq [H/2], RoPE scale [] float32 or None when every layer shares one)`` (else
    None); ctx ``(cache, q_positions [B, T], q_valid [B, T]
    (False for right padding), inv_freq [H/2])`` broadcast to every layer. Returns
    ``(x, (k_new, v_new, obs))``."""
    c = self.cfg
    d, n, k, h, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    b, t, _ = x.shape
    layer, probe, project, kind = scanned
    cache, q_positions, q_valid, inv_freq = ctx
    window = c.sliding_window
    scale = c.rope.attention_scale  # YaRN / LongRoPE: cos and sin times this (1.0 otherwise)
    if kind is not None:  # hybrid: this layer's window, RoPE and (if the kinds differ) its scale
      window, inv_freq, layer_scale = kind
      if layer_scale is not None:
        scale = layer_scale
    p = lambda name, shape, init=_init: self.param(name, init, shape, self.dtype)
    # Gemma's (1 + w) norms start at w = 0 (identity), the others at w = 1.
    norm_init = nn.initializers.zeros if c.norm_offset else nn.initializers.ones
    norm = lambda x_, name, dim: rms_norm(x_, p(name, (dim,), norm_init), c.rms_norm_eps,
                                          c.norm_offset)

    # --- attention -------------------------------------------------------------------------
    hx = norm(x, "attn_norm", d)
    q = hx @ p("wq", (d, n * h))   # [B, T, N*H]
    kk = hx @ p("wk", (d, k * h))  # [B, T, K*H]
    v = hx @ p("wv", (d, k * h))
    if c.qkv_bias:
      q = q + p("bq", (n * h,), nn.initializers.zeros)
      kk = kk + p("bk", (k * h,), nn.initializers.zeros)
      v = v + p("bv", (k * h,), nn.initializers.zeros)
    q = q.reshape(b, t, n, h)
    kk = kk.reshape(b, t, k, h)
    v = v.reshape(b, t, k, h)
    if c.qk_norm:
      q = norm(q, "q_norm", h)
      kk = norm(kk, "k_norm", h)
    if c.query_scale is not None and c.query_scale * math.sqrt(h) != 1.0:
      # Attention scales logits by 1/sqrt(H); folding the rest into q keeps every hook's
      # q.k / sqrt(H) equal to the model's logits (Gemma 3: query_pre_attn_scalar ** -0.5).
      q = (q.astype(jnp.float32) * (c.query_scale * math.sqrt(h))).astype(q.dtype)
    if probe is not None:  # additive zeros whose gradient is d loss / d (pre-RoPE k, v)
      kk = kk + probe[0].astype(kk.dtype)
      v = v + probe[1].astype(v.dtype)
    q_pre, k_pre = q, kk
    q = apply_rope(q, q_positions, inv_freq, scale)
    kk = apply_rope(kk, q_positions, inv_freq, scale)
    k_new = kk.transpose(0, 2, 1, 3)  # [B, K, T, H]
    v_new = v.transpose(0, 2, 1, 3)
    if project is not None:  # (x - mean) P + mean per head: a low-rank K/V (MatryoshkaKV)
      pk, mk, pv, mv = project  # [K, H, H], [K, H], [K, H, H], [K, H]
      proj = lambda x, p_, m_: (jnp.einsum("BKTH,KHG->BKTG", x - m_[:, None], p_)
                                + m_[:, None]).astype(x.dtype)
      k_new, v_new = proj(k_new, pk, mk), proj(v_new, pv, mv)
    probs = bool(getattr(self.observe, "wants_probs", False))
    gumbel = getattr(self.observe, "wants_gumbel_probs", None)
    if cache.quant is not None or not _fits_probs(q, cache, probs + (gumbel is not None)):
      probs, gumbel = False, None  # the hooks recompute what they need in their own pass
    out = chunk_attention(q, k_new, v_new, cache.keys, cache.values, cache.positions,
                          cache.lengths, q_positions, layer=layer,
                          sliding_window=window, block_size=self.attn_block_size,
                          quant=cache.quant, return_lse=self.observe is not None,
                          static_trip=probe is not None or project is not None,
                          impl=self.attn_impl, return_probs=probs, gumbel_probs=gumbel)
    obs = None
    if self.observe is not None:  # after attention: hooks see each query's normaliser
      attn, lse, *kept = out
      plain = kept.pop(0) if probs else None
      gkept = kept.pop(0) if gumbel is not None else None
      obs = self.observe(layer, LayerInputs(q, k_new, v_new, q_pre, k_pre.transpose(0, 2, 1, 3),
                                            q_positions, q_valid, inv_freq, lse, plain,
                                            window, gkept), cache)
    else:
      attn = out
    o = attn.reshape(b, t, n * h) @ p("wo", (n * h, d))
    if c.o_bias:
      o = o + p("bo", (d,), nn.initializers.zeros)
    if c.sandwich_norms:
      o = norm(o, "post_attn_norm", d)
    x = x + o

    # --- MLP -------------------------------------------------------------------------------
    hx = norm(x, "mlp_norm", d)
    gate = hx @ p("w_gate", (d, f))
    up = hx @ p("w_up", (d, f))
    if c.mlp_bias:
      gate = gate + p("b_gate", (f,), nn.initializers.zeros)
      up = up + p("b_up", (f,), nn.initializers.zeros)
    act = _gelu_tanh if c.mlp_act == "gelu_tanh" else nn.silu
    y = (act(gate) * up) @ p("w_down", (f, d))
    if c.mlp_bias:
      y = y + p("b_down", (d,), nn.initializers.zeros)
    if c.sandwich_norms:
      y = norm(y, "post_mlp_norm", d)
    return x + y, (k_new, v_new, obs)


class Decoder(nn.Module):
  """Token embedding -> L scanned layers -> final norm -> LM head (-> softcap)."""

  cfg: ModelConfig
  dtype: Any = jnp.float32
  attn_block_size: int = 512
  observe: Any = None
  attn_impl: str = "xla"

  @nn.compact
  def __call__(self, tokens, cache: KVCache, n_valid, logit_index=None, probe=None,
               project=None):
    """Forward over ``tokens [B, T]`` appended after ``cache``.

    Args:
      n_valid: ``[B]`` how many of the T tokens are real (right padding beyond).
      logit_index: ``[B]`` which token's logits to return, or None for all.
      probe: optional ``(dk, dv)``, each ``[L, B, T, K, H]``, added to every layer's pre-RoPE
        keys and values; differentiate with respect to it (at zeros) for the gradient of a loss
        with respect to the K/V activations (KVQuant's Fisher information). With a probe, the
        layers are rematerialised on the backward pass and attention loops have static trip
        counts, so the forward is reverse-differentiable.
      project: optional ``(pk, mk, pv, mv)``: ``pk, pv [L, K, H, H]`` projection matrices and
        ``mk, mv [L, K, H]`` means; every layer's post-RoPE keys and values become
        ``(x - m) @ p + m`` per kv head before attention and caching (MatryoshkaKV's
        distillation: ``p = U diag(mask) U^T``). Attention loops get static trip counts, so
        the forward is reverse-differentiable with respect to ``project``.

    Returns:
      ``(logits [B, V] or [B, T, V] float32, cache with the tokens appended, observations)``.
    """
    c = self.cfg
    windows = getattr(cache, "windows", None)
    if c.hybrid and windows is None:  # else methods would compress local layers to a ratio
      raise ValueError(f"{c.family} has sliding-window and global layers: its cache must carry "
                       f"the per-layer windows; make it with LanguageModel.new_cache (or "
                       f"KVCache.init(..., windows=apply_fn.layer_windows))")
    if windows is not None and windows != c.layer_windows:
      raise ValueError(f"this cache was made for per-layer windows {windows}, the model has "
                       f"{c.layer_windows}: make it with the model's LanguageModel.new_cache")
    embed = self.param("embed", _init, (c.vocab_size, c.hidden_size), self.dtype)
    x = jnp.take(embed, tokens, axis=0)  # [B, T, D]
    if c.embed_scale:  # sqrt(D) rounded to float32, then to the compute dtype (as HF)
      x = x * jnp.asarray(np.float32(math.sqrt(c.hidden_size))).astype(x.dtype)
    t = tokens.shape[1]
    q_positions = cache.next_position[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    # dynamic NTK scales with the length of the real tokens (right padding must not count).
    seen = jnp.max(cache.next_position + n_valid)
    inv_freq = inv_freq_for(c.rope, seen)
    kind = None
    if c.hybrid:  # per layer: window [L] and RoPE [L, H/2] of its kind
      local = np.array([kt == LOCAL for kt in c.layer_types])
      win = jnp.asarray(np.where(local, c.sliding_window or NO_WINDOW, NO_WINDOW), jnp.int32)
      inv_local = inv_freq_for(c.rope_local or c.rope, seen)
      scales = ((c.rope_local or c.rope).attention_scale, c.rope.attention_scale)
      layer_scale = None if scales[0] == scales[1] else jnp.asarray(
          np.where(local, scales[0], scales[1]), jnp.float32)  # [L]
      kind = (win, jnp.where(jnp.asarray(local)[:, None], inv_local[None], inv_freq[None]),
              layer_scale)

    layer_cls = nn.remat(DecoderLayer) if probe is not None else DecoderLayer
    layers = nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast),
        out_axes=0,
        length=c.num_layers,
    )(c, self.dtype, self.attn_block_size, self.observe, self.attn_impl, name="layers")
    layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)
    q_valid = jnp.arange(t, dtype=jnp.int32)[None, :] < n_valid[:, None]  # [B, T]
    x, (k_new, v_new, obs) = layers(x, (layer_ids, probe, project, kind),
                                    (cache, q_positions, q_valid, inv_freq))
    cache = cache.append(k_new, v_new, n_valid)

    if logit_index is not None:
      x = jnp.take_along_axis(x, logit_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    norm_init = nn.initializers.zeros if c.norm_offset else nn.initializers.ones
    x = rms_norm(x, self.param("final_norm", norm_init, (c.hidden_size,), self.dtype),
                 c.rms_norm_eps, c.norm_offset)
    if c.tie_word_embeddings:
      # A dot contracting both operands' last axis: ``x @ embed.T`` made XLA (CPU) copy the
      # transposed [D, V] table out of the embedding inside every decode step (113 MB here).
      logits = jax.lax.dot_general(x, embed, (((x.ndim - 1,), (1,)), ((), ())))
    else:
      logits = x @ self.param("lm_head", _init, (c.hidden_size, c.vocab_size), self.dtype)
    logits = logits.astype(jnp.float32)
    if c.final_logit_softcap:
      logits = jnp.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
    return logits, cache, obs


def make_apply_fn(cfg: ModelConfig, dtype=jnp.float32, attn_block_size: int = 512,
                  attn_impl: str = "xla"):
  """Returns the pure ``apply_fn(params, tokens, cache, n_valid, logit_index, observe, *,
  probe=None, project=None)`` that ``lib.generate`` expects (``Decoder.__call__`` for the
  arguments; ``probe`` and ``project`` serve the calibrations in ``lib`` that differentiate
  through the model). Modules are built once per observe hook and cached.

  ``attn_impl``: ``"xla"`` (default, every backend), ``"pallas"`` (decode steps read a paged
  store with the Pallas kernel; for GPU/TPU, not yet measured there), ``"interpret"`` (the same
  kernel in interpret mode: CPU tests), ``"auto"`` (``"pallas"`` on GPU/TPU, else ``"xla"``).
  """
  if attn_impl == "auto":
    attn_impl = "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
  if attn_impl not in IMPLS:
    raise ValueError(f"attn_impl must be one of {IMPLS + ('auto',)}, got {attn_impl!r}")
  modules: dict[Any, Decoder] = {}

  def apply_fn(params, tokens, cache, n_valid, logit_index=None, observe=None, *, probe=None,
               project=None):
    if observe not in modules:
      modules[observe] = Decoder(cfg, dtype, attn_block_size, observe, attn_impl)
    return modules[observe].apply({"params": params}, tokens, cache, n_valid, logit_index, probe,
                                  project)

  # Per-layer sliding windows of a hybrid model (``KVCache.windows``), for code in ``lib`` that
  # makes caches from an apply_fn alone; None when every layer is alike.
  apply_fn.layer_windows = cfg.layer_windows
  return apply_fn


def init_params(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32):
  """Random parameters with the exact tree the loaders produce (for tests and shapes)."""
  cache = KVCache.init(num_layers=cfg.num_layers, batch=1, kv_heads=cfg.num_kv_heads,
                       capacity=8, head_dim=cfg.head_dim, dtype=dtype, windows=cfg.layer_windows)
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Decoder(cfg, dtype).init(rng, tokens, cache, jnp.ones((1,), jnp.int32))["params"]
