"""Observation-window helpers shared by SnapKV, PyramidKV, TOVA and AdaKV-style scorers.

During prefill, each chunk reports the last ``W`` real queries it holds per row; after prefill
the ``W`` latest of those are the observation window (it may straddle chunks). Window attention
``A = softmax(q_win K^T / sqrt(H))`` over the cached keys (causal by original position) is then
computed one layer at a time, so memory is O(B * N * W * S) for one layer, never S x S.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvlab.lib.cache import KVCache
from kvlab.lib.methods.base import merge_chunks, scale


@functools.lru_cache(maxsize=None)
def last_queries(window: int):
  """Returns an observe hook that records the last ``window`` real queries of each chunk.

  Cached per window, so the same hook object (a static jit argument) is reused."""

  def observe(layer, x, cache):
    del layer, cache
    q, q_positions, q_valid = x.q, x.positions, x.valid
    t = q.shape[1]
    w = min(window, t)
    n_valid = q_valid.sum(-1).astype(jnp.int32)  # [B]
    idx = n_valid[:, None] - w + jnp.arange(w, dtype=jnp.int32)[None, :]  # [B, W]
    ok = idx >= 0
    idx = jnp.clip(idx, 0, t - 1)
    qw = jnp.take_along_axis(q, idx[:, :, None, None], axis=1)  # [B, W, N, H]
    pos = jnp.where(ok, jnp.take_along_axis(q_positions, idx, axis=1), -1)
    return {"q": qw, "pos": pos}

  return observe


def window_queries(obs, window: int):
  """Stacked chunk observations -> the ``window`` latest queries per (layer, row).

  Returns ``(q [L, B, W, N, H], pos [L, B, W])``; ``pos == -1`` marks a missing query (a prompt
  shorter than the window).
  """
  qs = merge_chunks(obs["q"])  # [L, B, C*w, N, H]
  ps = merge_chunks(obs["pos"])  # [L, B, C*w]
  w = min(window, ps.shape[-1])
  top, sel = jax.lax.top_k(ps, w)
  q = jnp.take_along_axis(qs, sel[..., None, None], axis=2)
  return q, top


def window_attention(cache: KVCache, q_win: jax.Array, q_pos: jax.Array) -> jax.Array:
  """Softmax attention of window queries over the cache.

  Args:
    q_win: ``[L, B, W, N, H]`` post-RoPE queries; ``q_pos [L, B, W]`` (-1 = missing).

  Returns:
    ``[L, B, K, G, W, S]`` float32 probabilities (rows of missing queries are zero).
  """
  _, b, w, n, h = q_win.shape
  kh = cache.kv_heads

  def one_layer(args):
    q, qp, keys, kpos, klen = args  # [B,W,N,H], [B,W], [B,K,S,H], [B,K,S], [B,K]
    qg = q.astype(jnp.float32).reshape(b, w, kh, n // kh, h) * scale(h)
    logits = jnp.einsum("BWKGH,BKSH->BKGWS", qg, keys.astype(jnp.float32))
    s_cap = keys.shape[2]
    valid = (jnp.arange(s_cap)[None, None, :] < klen[..., None])  # [B, K, S]
    causal = kpos[:, :, None, None, :] <= qp[:, None, None, :, None]  # [B, K, 1, W, S]
    mask = valid[:, :, None, None, :] & causal & (qp >= 0)[:, None, None, :, None]
    logits = jnp.where(mask, logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    return jnp.where(mask, p, 0.0)

  return jax.lax.map(one_layer, (q_win, q_pos, cache.keys, cache.positions, cache.lengths))


def avg_pool(x: jax.Array, kernel: int) -> jax.Array:
  """1-D average pool over the last axis, stride 1, zero padding counted (PyTorch
  ``avg_pool1d(padding=k//2)``); same length for odd kernels."""
  if kernel <= 1:
    return x
  pad = [(0, 0)] * (x.ndim - 1) + [(kernel // 2, kernel // 2)]
  s = jax.lax.reduce_window(jnp.pad(x, pad), 0.0, jax.lax.add, (1,) * (x.ndim - 1) + (kernel,),
                            (1,) * x.ndim, "VALID")
  return s / kernel


def max_pool(x: jax.Array, kernel: int) -> jax.Array:
  """1-D max pool over the last axis, stride 1, 'SAME' padding."""
  if kernel <= 1:
    return x
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1,) * (x.ndim - 1) + (kernel,),
                               (1,) * x.ndim, "SAME")


def effective_window(window: int, kept: jax.Array | None = None):
  """The window a head uses: ``window``, or where its budget ``kept [L, B, K]`` is not larger
  than the window, ``max(kept // 2, 1)`` (``[L, B, K, 1]``): a window filling the budget would
  leave nothing to choose by score (the prompt's first tokens, attention sinks, would always be
  evicted), so it runs as if given that smaller window (the reference code refuses a budget not
  larger than the window)."""
  if kept is None:
    return window
  return jnp.where(kept > window, window, jnp.maximum(kept // 2, 1))[..., None]


def in_window(cache: KVCache, q_pos: jax.Array, window: int,
              kept: jax.Array | None = None) -> jax.Array:
  """``[L, B, K, S]`` bool: cached tokens inside the last ``window`` positions of the prompt
  (per head ``effective_window(window, kept)`` with budgets ``kept``)."""
  last = q_pos.max(-1)[:, :, None, None]  # [L, B, 1, 1]
  w = effective_window(window, kept)
  return (cache.positions > last - w) & (cache.positions >= 0)


def window_query_mask(q_pos: jax.Array, window: int, kept: jax.Array | None = None):
  """``[L, B, K, W]`` bool: the window queries (``q_pos [L, B, W]``) that vote for each head,
  the latest ``effective_window(window, kept)``; missing queries (``-1``) never vote."""
  last = q_pos.max(-1)[:, :, None, None]  # [L, B, 1, 1]
  w = effective_window(window, kept)
  return (q_pos[:, :, None, :] > last - w) & (q_pos[:, :, None, :] >= 0)
