"""Accumulated-attention scorers: H2O and Keyformer.

Their score of a token is the attention it received from every prompt query, summed. We never
build the S x S matrix: during chunked prefill, each chunk's queries are softmaxed over the cache
so far plus the chunk itself (causal), and the column sums are written at the slots the chunk's
keys will occupy. Summing the per-chunk sums gives the exact full-prompt column sums.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from lib.attention import cache_block
from lib.cache import KVCache
from lib.methods.base import Method, evict_one, forced


@functools.lru_cache(maxsize=None)
def column_sums(gumbel_tau: float | None = None, seed: int = 0):
  """Observe hook: ``[B, K, S]`` attention mass each cache slot receives from this chunk's
  queries (mean over each GQA group). With ``gumbel_tau``, the probabilities are Keyformer's
  Gumbel-softmax ``softmax((x + G) / tau)``, fresh noise per layer and chunk (a softmax of its
  own over the chunk's logits); without, they come from the attention's normalisers in one
  blockwise pass (``_sums_from_lse``)."""

  def observe(layer, x, cache):
    if gumbel_tau is None and x.lse is not None:
      return _sums_from_lse(layer, x, cache)
    q, k_new, q_positions, q_valid = x.q, x.k, x.positions, x.valid
    b, t, n, h = q.shape
    kh = k_new.shape[1]
    keys = jax.lax.dynamic_index_in_dim(cache.keys, layer, 0, keepdims=False)  # [B, K, S, H]
    lens = jax.lax.dynamic_index_in_dim(cache.lengths, layer, 0, keepdims=False)  # [B, K]
    s_cap = keys.shape[2]
    qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h) / math.sqrt(h)
    lc = jnp.einsum("BTKGH,BKSH->BKGTS", qg, keys.astype(jnp.float32))
    ln = jnp.einsum("BTKGH,BKUH->BKGTU", qg, k_new.astype(jnp.float32))
    mc = (jnp.arange(s_cap)[None, None, :] < lens[..., None])[:, :, None, None, :]
    mn = jnp.tril(jnp.ones((t, t), bool))[None, None, None]
    x = jnp.concatenate([jnp.where(mc, lc, -jnp.inf), jnp.where(mn, ln, -jnp.inf)], -1)
    if gumbel_tau is not None:
      key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), layer),
                               q_positions[0, 0])
      x = (x + jax.random.gumbel(key, x.shape)) / gumbel_tau
    p = jax.nn.softmax(x, axis=-1)
    p = jnp.where(q_valid[:, None, None, :, None], p, 0.0)
    col = p.sum(3).mean(2)  # [B, K, S + T]
    # The chunk's keys land at slots [lens, lens + T) of each (row, head): put their sums there.
    return col[..., :s_cap] + _place_new(col[..., s_cap:], lens, s_cap)

  return observe


def _place_new(col_new, lens, s_cap):
  """``[B, K, T]`` sums of the chunk's own keys -> ``[B, K, S]`` at slots ``[lens, lens + T)``."""
  b, kh, t = col_new.shape
  place = jax.vmap(jax.vmap(lambda z, new, start: jax.lax.dynamic_update_slice(z, new, (start,))))
  return place(jnp.zeros((b, kh, s_cap + t), jnp.float32), col_new, lens)[..., :s_cap]


def _sums_from_lse(layer, x, cache, block: int = 512):
  """Column sums from the attention's own normalisers ``x.lse``: one pass of ``q.k`` over the
  valid cache blocks, ``exp(s - lse)`` summed over queries (no second softmax, nothing
  ``T x S`` beyond one block). Masks as attention does (validity, causality, sliding window).
  """
  q, k_new, lse = x.q, x.k, x.lse  # lse [B, K, G, T]
  b, t, n, h = q.shape
  kh = k_new.shape[1]
  f32 = jnp.float32
  qg = (q.astype(f32) / math.sqrt(h)).reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4)
  qpos = x.positions[:, None, None, :, None]  # [B, 1, 1, T, 1]
  qok = x.valid[:, None, None, :, None]
  win = x.sliding_window
  window_ok = (lambda kp: True) if win is None else (lambda kp: (qpos - kp) < win)
  lens = jax.lax.dynamic_index_in_dim(cache.lengths, layer, 0, keepdims=False)  # [B, K]
  s_cap = cache.capacity
  bs = min(block, s_cap)

  def body(i, out):
    kb, pb, ok = cache_block(cache.keys, cache.positions, lens, layer, i, bs)
    ok = ok[:, :, None, None, :] & qok & window_ok(pb[:, :, None, None, :])
    s = jnp.einsum("BKGTH,BKSH->BKGTS", qg, kb.astype(f32))
    p = jnp.where(ok, jnp.exp(s - lse[..., None]), 0.0)
    start = jnp.minimum(i * bs, s_cap - bs)  # where cache_block read (masked overlap adds 0)
    cur = jax.lax.dynamic_slice(out, (0, 0, start), (b, kh, bs))
    return jax.lax.dynamic_update_slice(out, cur + p.sum(3).mean(2), (0, 0, start))

  n_blocks = (jnp.max(lens) + bs - 1) // bs
  out = jax.lax.fori_loop(0, n_blocks, body, jnp.zeros((b, kh, s_cap), f32))
  sn = jnp.einsum("BKGTH,BKUH->BKGTU", qg, k_new.astype(f32))
  causal = jnp.tril(jnp.ones((t, t), bool))[None, None, None]
  ok = causal & qok & window_ok(x.positions[:, None, None, None, :])
  p = jnp.where(ok, jnp.exp(sn - lse[..., None]), 0.0)
  return out + _place_new(p.sum(3).mean(2), lens, s_cap)


def _recent_mask(cache: KVCache, kept_fraction_of_len, recent_fraction: float):
  """``[L, B, K, S]``: the ``recent_fraction`` most recent tokens of each row's budget."""
  n = cache.next_position.astype(jnp.float32)  # [B]
  recent = jnp.ceil(kept_fraction_of_len(n) * recent_fraction)
  return cache.positions >= (n - recent)[None, :, None, None]


@dataclasses.dataclass(frozen=True)
class H2O(Method):
  """H2O (Zhang et al. 2023) at prefill: heavy hitters by attention summed over all prompt
  queries, plus the most recent tokens. Choice: half the budget is the recent window
  (``recent_fraction=0.5``, the paper's heavy_ratio = recent_ratio)."""

  recent_fraction: float = 0.5
  name = "h2o"

  @property
  def observe(self):
    return column_sums()

  def _fraction(self, n):
    return self.ratio * n if self.ratio is not None else jnp.minimum(n, self.budget)

  def scores(self, cache: KVCache, obs):
    s = obs.sum(0)  # [L, B, K, S] summed over chunks
    return jnp.where(_recent_mask(cache, self._fraction, self.recent_fraction),
                     forced(cache.positions), s)

  def carried_scores(self, cache: KVCache, obs):
    return obs.sum(0)

  def update(self, cache: KVCache, obs):
    """Decode time: add this step's attention to each slot's score; once the cache is full,
    evict the lowest-scored slot outside the recent window (``recent_fraction`` of the
    capacity), so the next token always has a free slot."""
    acc = (0.0 if cache.scores is None else cache.scores) + obs  # obs [L, B, K, S]
    recent = max(1, int(self.recent_fraction * cache.capacity))
    protect = cache.positions >= (cache.next_position - recent)[None, :, None, None]
    cache = cache.replace(scores=acc)
    return evict_one(cache, jnp.where(protect, jnp.inf, acc), cache.lengths >= cache.capacity)


@dataclasses.dataclass(frozen=True)
class Keyformer(Method):
  """Keyformer (Adnan et al. 2024) at prefill: accumulated Gumbel-softmax scores
  (``tau_init=1.0`` at the prompt) plus a recent window of 30 % of the budget (authors' cfg)."""

  recent_fraction: float = 0.3
  tau: float = 1.0
  seed: int = 0
  name = "keyformer"

  @property
  def observe(self):
    return column_sums(self.tau, self.seed)

  def _fraction(self, n):
    return self.ratio * n if self.ratio is not None else jnp.minimum(n, self.budget)

  def scores(self, cache: KVCache, obs):
    s = obs.sum(0)
    return jnp.where(_recent_mask(cache, self._fraction, self.recent_fraction),
                     forced(cache.positions), s)
