"""Decoding several compressed caches of one sample as one batch.

An evaluation sample is answered once per (method, ratio) cell, and each answer is a 48-step
greedy decode of a 135M model: on a CPU that is bound by reading the weights, so one step for
a batch of 20 rows costs little more than a step for one row. Cells whose compressed caches are
plain keys/values (every prefill-time eviction method; AdaKV/PyramidKV through the padded view
of their pages) are stacked along the batch axis, padded to one capacity, and asked the same
question together. Attention masks each row to its own valid slots, so every row's answer is
the one it would get alone, up to float rounding of the batched matmuls (tested).

Caches that cannot be stacked (decode-time evicting methods, which carry per-slot scores and a
fixed capacity; quantized or low-rank stores) are answered one at a time by the runner.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from kvlab.lib.cache import KVCache
from kvlab.lib.paged import PagedStore


def plain_rows(cache: KVCache) -> KVCache | None:
  """The cache as plain keys/values ``[L, B, K, S, H]`` with no stored part, or None.

  A paged AdaKV/PyramidKV cache (``quant`` is a ``PagedStore`` and its full-precision window
  is still empty) becomes its padded view: the same keys, values and positions per head,
  which attention reads to the same result (``tests/test_paged.py``). Caches with per-slot
  scores (decode-time eviction) or another stored part return None.
  """
  if cache.scores is not None:
    return None
  if cache.quant is None:
    return cache
  if isinstance(cache.quant, PagedStore) and int(jnp.max(cache.lengths)) == 0:
    keys, values, positions = cache.quant.dense()
    return KVCache(keys=keys, values=values, positions=positions,
                   lengths=cache.quant.lengths, next_position=cache.next_position,
                   windows=cache.windows)
  return None


def stack_rows(caches: Sequence[KVCache], capacity: int) -> KVCache:
  """Concatenates plain caches (each ``[L, 1, K, S_i, H]``) along the batch axis.

  Every cache is first resized to ``capacity`` slots (which must hold each one's valid slots
  plus the room its answer needs). Returns a ``[L, len(caches), K, capacity, H]`` cache whose
  row ``i`` is ``caches[i]``.
  """
  if not caches:
    raise ValueError("stack_rows needs at least one cache")
  bad = [i for i, c in enumerate(caches) if c.quant is not None or c.scores is not None]
  if bad:
    raise ValueError(f"caches {bad} carry a stored part or scores; pass them through "
                     "plain_rows first (and answer those that return None one at a time)")
  if len({c.windows for c in caches}) > 1:
    raise ValueError("stack_rows got caches of models with different per-layer windows")
  rows = [c.resize(capacity) for c in caches]
  cat = lambda name, axis: jnp.concatenate([getattr(c, name) for c in rows], axis=axis)
  return KVCache(keys=cat("keys", 1), values=cat("values", 1), positions=cat("positions", 1),
                 lengths=cat("lengths", 1), next_position=cat("next_position", 0),
                 windows=caches[0].windows)
