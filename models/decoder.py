"""Flax Linen decoder for the Llama family (Llama 2/3.x, Mistral, SmolLM2), Qwen2 and Qwen3.

Letters: B batch, T new tokens, D width, F MLP width, N query heads, K kv heads, H head dim,
V vocab, L layers, S cache slots.

Layers are stacked on a leading axis and run under ``nn.scan`` (compile time flat in depth).
The cache is explicit: it goes in and comes out. Inside the layer scan the whole stacked cache
is broadcast and only read (attention slices the blocks it needs at ``[layer]``); the new
keys/values of every layer are appended once after the scan (``KVCache.append``), so no
per-layer copy of the cache is made.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvlab.lib.attention import IMPLS, LayerInputs, chunk_attention
from kvlab.lib.cache import KVCache
from kvlab.lib.rope import apply_rope, inv_freq_for
from kvlab.models.config import ModelConfig

_init = nn.initializers.normal(0.02)


# Largest buffer (bytes) the attention may keep for hooks that take its probabilities
# (``[B, K, G, T, S]`` float32 per layer and kind, transient); above it the hooks recompute.
PROBS_MAX_BYTES = 1 << 30


def _fits_probs(q, cache, buffers: int = 1) -> bool:
  """Whether this call's ``buffers`` ``[B, N, T, S]`` probability buffers (plain and/or
  Gumbel) fit ``PROBS_MAX_BYTES`` together."""
  b, t, n, _ = q.shape
  return buffers * b * n * t * cache.capacity * 4 <= PROBS_MAX_BYTES


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis in float32; returns ``x.dtype``."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (weight.astype(jnp.float32) * xf).astype(x.dtype)


class DecoderLayer(nn.Module):
  """Pre-norm attention + SwiGLU MLP. Called under ``nn.scan`` with one layer's cache slice."""

  cfg: ModelConfig
  dtype: Any = jnp.float32
  attn_block_size: int = 512
  observe: Any = None
  attn_impl: str = "xla"

  @nn.compact
  def __call__(self, x, scanned, ctx):
    """x ``[B, T, D]``; scanned ``(layer, probe, project)``: this layer's index and its slices
    of the optional ``probe`` and ``project``; ctx ``(cache, q_positions [B, T], q_valid
    [B, T] (False for right padding), inv_freq [H/2])`` broadcast to every layer. Returns
    ``(x, (k_new, v_new, obs))``."""
    c = self.cfg
    d, n, k, h, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    b, t, _ = x.shape
    layer, probe, project = scanned
    cache, q_positions, q_valid, inv_freq = ctx
    p = lambda name, shape, init=_init: self.param(name, init, shape, self.dtype)

    # --- attention -------------------------------------------------------------------------
    hx = rms_norm(x, p("attn_norm", (d,), nn.initializers.ones), c.rms_norm_eps)
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
      q = rms_norm(q, p("q_norm", (h,), nn.initializers.ones), c.rms_norm_eps)
      kk = rms_norm(kk, p("k_norm", (h,), nn.initializers.ones), c.rms_norm_eps)
    if probe is not None:  # additive zeros whose gradient is d loss / d (pre-RoPE k, v)
      kk = kk + probe[0].astype(kk.dtype)
      v = v + probe[1].astype(v.dtype)
    q_pre, k_pre = q, kk
    q = apply_rope(q, q_positions, inv_freq)
    kk = apply_rope(kk, q_positions, inv_freq)
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
                          sliding_window=c.sliding_window, block_size=self.attn_block_size,
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
                                            c.sliding_window, gkept), cache)
    else:
      attn = out
    o = attn.reshape(b, t, n * h) @ p("wo", (n * h, d))
    if c.o_bias:
      o = o + p("bo", (d,), nn.initializers.zeros)
    x = x + o

    # --- MLP -------------------------------------------------------------------------------
    hx = rms_norm(x, p("mlp_norm", (d,), nn.initializers.ones), c.rms_norm_eps)
    gate = hx @ p("w_gate", (d, f))
    up = hx @ p("w_up", (d, f))
    if c.mlp_bias:
      gate = gate + p("b_gate", (f,), nn.initializers.zeros)
      up = up + p("b_up", (f,), nn.initializers.zeros)
    y = (nn.silu(gate) * up) @ p("w_down", (f, d))
    if c.mlp_bias:
      y = y + p("b_down", (d,), nn.initializers.zeros)
    return x + y, (k_new, v_new, obs)


class Decoder(nn.Module):
  """Token embedding -> L scanned layers -> final norm -> LM head."""

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
    embed = self.param("embed", _init, (c.vocab_size, c.hidden_size), self.dtype)
    x = jnp.take(embed, tokens, axis=0)  # [B, T, D]
    t = tokens.shape[1]
    q_positions = cache.next_position[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    # dynamic NTK scales with the length of the real tokens (right padding must not count).
    inv_freq = inv_freq_for(c.rope, jnp.max(cache.next_position + n_valid))

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
    x, (k_new, v_new, obs) = layers(x, (layer_ids, probe, project),
                                    (cache, q_positions, q_valid, inv_freq))
    cache = cache.append(k_new, v_new, n_valid)

    if logit_index is not None:
      x = jnp.take_along_axis(x, logit_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    x = rms_norm(x, self.param("final_norm", nn.initializers.ones, (c.hidden_size,), self.dtype),
                 c.rms_norm_eps)
    if c.tie_word_embeddings:
      # A dot contracting both operands' last axis: ``x @ embed.T`` made XLA (CPU) copy the
      # transposed [D, V] table out of the embedding inside every decode step (113 MB here).
      logits = jax.lax.dot_general(x, embed, (((x.ndim - 1,), (1,)), ((), ())))
    else:
      logits = x @ self.param("lm_head", _init, (c.hidden_size, c.vocab_size), self.dtype)
    return logits.astype(jnp.float32), cache, obs


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

  return apply_fn


def init_params(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32):
  """Random parameters with the exact tree the loaders produce (for tests and shapes)."""
  cache = KVCache.init(num_layers=cfg.num_layers, batch=1, kv_heads=cfg.num_kv_heads,
                       capacity=8, head_dim=cfg.head_dim, dtype=dtype)
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Decoder(cfg, dtype).init(rng, tokens, cache, jnp.ones((1,), jnp.int32))["params"]
