"""MiniCache (Liu et al. 2024, METHODS.md §4.4): merges the KV caches of adjacent layer pairs
from the middle depth on. Per token and head, the two layers' vectors share one unit direction
(SLERP of theirs) and keep their own norms; the tokens whose two vectors are farthest apart
(largest angle) keep their originals (``lib.lowrank.merged``).

Choices:
* pairs ``(l, l + 1)`` for ``l = first, first + 2, ...`` with ``first = floor(start * L)``
  (``start=0.5``: half depth, as in the paper); an odd leftover last layer stays unmerged.
* ``t = 0.6`` (the paper; xKV's re-implementation uses 0.5): the direction leans to the deeper
  layer.
* retention: the paper retains the tokens whose angle exceeds ``d_min + (d_max - d_min) *
  gamma``, a data-dependent count; here a fixed fraction ``retain`` (default 0.05) of the
  prefill tokens, ``ceil(retain * n)`` per (pair, row, head) with n the longest row, keeps
  shapes static (``retain=1`` keeps every original: exact, and larger than the full cache).
  Keys and values are merged separately, each with its own directions, norms and retained
  tokens. A merged pair stores ``(H + 2 + retain * (2 H + 4 / itemsize)) / (2 H)`` of its two
  layers' bytes: 0.567 at H=64 in bf16 with the default retain.
* keys are merged post-RoPE (both layers' keys at one position share the rotation, so the
  angle between them does not depend on it); no observations are needed.
* only the prefill is merged: decoded tokens stay in the full-precision window (the paper also
  merges decode-time tokens).
* MiniCache needs the same tokens in every layer and head (a pair is merged token by token):
  it runs on the full cache or after a layer- and head-uniform eviction; after per-head
  eviction it raises. It takes the cache's stored-part slot, so it does not compose with a
  quantizer (the paper's headline adds 4-bit KIVI on top).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib.cache import KVCache, round_capacity
from kvlab.lib.lowrank.merged import MergedStore, slerp_merge
from kvlab.lib.methods.base import check_types
from kvlab.lib.quant.store import check_plain, check_uniform_tokens, first_slots


@dataclasses.dataclass(frozen=True)
class MiniCache:
  """Merges layer pairs from depth ``start`` (fraction of the layers) on; SLERP weight ``t``
  on the deeper layer; ``retain`` fraction of tokens kept unmerged per pair, row and head."""

  start: float = 0.5
  t: float = 0.6
  retain: float = 0.05
  name = "minicache"
  quantizes = True  # keeps every token (changes its representation): composes last
  observe = None

  def __post_init__(self):
    check_types(self)
    if not 0.0 <= self.start < 1.0:
      raise ValueError(f"minicache: start is the fraction of the depth where merging begins, "
                       f"in [0, 1), got {self.start}")
    if not 0.0 <= self.t <= 1.0:
      raise ValueError(f"minicache: t is the SLERP weight of the deeper layer, in [0, 1], got "
                       f"{self.t}")
    if not 0.0 <= self.retain <= 1.0:
      raise ValueError(f"minicache: retain is the fraction of tokens kept unmerged, in [0, 1], "
                       f"got {self.retain}")

  def layout(self, num_layers: int) -> tuple[int, int]:
    """``(first merged layer, number of pairs)`` for a model of ``num_layers`` layers."""
    first = int(math.floor(self.start * num_layers))
    return first, (num_layers - first) // 2

  def apply(self, cache: KVCache, observations=None, *, extra: int = 0,
            block: int = 512) -> KVCache:
    """Merges the layer pairs of every valid token of ``cache`` (must be uniform over layers
    and heads); leaves an empty full-precision window of ``extra`` slots (rounded to 8) for
    decoded tokens, which stay unmerged. Returns the cache with a ``MergedStore``."""
    del observations, block
    check_plain(self.name, cache)
    n = check_uniform_tokens(self.name, "a layer pair is merged token by token", cache)
    cap = max(-(-n // 64) * 64, 64)
    first, pairs = self.layout(cache.num_layers)
    kept = min(int(np.ceil(self.retain * n)), n) if pairs else 0
    return _merge_cache(self, cache, cap, round_capacity(extra), first, pairs, kept)


@functools.partial(jax.jit,
                   static_argnames=("method", "cap", "res_cap", "first", "pairs", "kept"))
def _merge_cache(method: MiniCache, cache: KVCache, cap: int, res_cap: int, first: int,
                 pairs: int, kept: int) -> KVCache:
  l, b, k, _, h = cache.keys.shape
  take = lambda x: first_slots(x, cap)
  valid_lbk = jnp.arange(cap) < cache.lengths[..., None]  # [L, B, K, Q]
  pos = jnp.where(valid_lbk, take(cache.positions), -1)
  valid = valid_lbk[0]  # [B, K, Q] (the same for every layer)
  end = first + 2 * pairs
  unmerged = np.concatenate([np.arange(first), np.arange(end, l)]).astype(np.int32)

  def merge(x):  # x [L, B, K, Q, H] -> dir [P, B, K, Q, H], norm [2P, ...], kept, index
    x = take(x)
    x1, x2 = x[first:end:2], x[first + 1:end:2]  # [P, B, K, Q, H]
    e, n1, n2, angle = slerp_merge(x1, x2, method.t)
    e = jnp.where(valid[..., None], e, 0.0)
    norm = jnp.where(valid, jnp.stack([n1, n2], 1), 0.0).reshape((2 * pairs, b, k, cap))
    _, index = jax.lax.top_k(jnp.where(valid, angle, -1.0), kept)  # [P, B, K, R]: largest angles
    gather = lambda y: jnp.take_along_axis(y, index[..., None], axis=3)
    originals = jnp.stack([gather(x1), gather(x2)], 1).reshape((2 * pairs, b, k, kept, h))
    dt = x.dtype
    return (x[unmerged], e.astype(dt), norm.astype(dt), originals,
            index.astype(jnp.int32))

  ku, kd, kn, kk, ki = merge(cache.keys)
  vu, vd, vn, vk, vi = merge(cache.values)
  store = MergedStore(keys=ku, values=vu, k_dir=kd, k_norm=kn, k_kept=kk, k_index=ki,
                      v_dir=vd, v_norm=vn, v_kept=vk, v_index=vi, positions=pos,
                      lengths=cache.lengths, first=first)
  shape = (l, b, k, res_cap)
  return cache.replace(keys=jnp.zeros(shape + (h,), cache.keys.dtype),
                       values=jnp.zeros(shape + (h,), cache.values.dtype),
                       positions=jnp.full(shape, -1, jnp.int32),
                       lengths=jnp.zeros(shape[:3], jnp.int32), scores=None, quant=store)
