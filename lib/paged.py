"""Ragged storage of a compressed cache: each (layer, row, kv head) keeps only its own pages.

AdaKV (budgets per head) and PyramidKV (budgets per layer) keep different numbers of tokens in
different heads. The stacked ``[L, B, K, S, H]`` arrays of ``KVCache`` would pad every head to the
largest budget of all. A ``PagedStore`` instead holds the kept tokens in one pool of pages
shared by all layers, rows and heads, and each (layer, row, head) lists its own pages:

Letters: L layers, B batch, K kv heads, N pages in the pool, P slots per page, M pages listed per
head, H head dim.

* ``k_pages, v_pages [N, P, H]`` (the cache's dtype), ``positions [N, P]`` int32 original
  positions (-1 past a head's length); ``N = sum over (l, b, k) of ceil(length / P)``, so only
  the last page of each head holds padding;
* ``page_table [L, B, K, M]`` int32 pool indices, a head's own pages first; later entries point
  at page 0 (read by the XLA path and masked by length; the Pallas kernel skips them);
* ``lengths [L, B, K]`` int32 valid tokens.

The store is the cache's stored part (``KVCache.quant``): the full-precision ``keys/values``
arrays of the cache become a small window that receives the tokens appended later (question,
answer), and attention reads the pages block by block through ``read`` like any other store.
``kernel_inputs(layer)`` hands the pool and that layer's table to
``pallas_kernels.sparse_decode_attention.paged_decode_attention`` as they are (no copy).

Sharding: ``page_table`` and ``lengths`` follow the ``[L, B, K, ...]`` rule of
``lib.sharding.cache_specs`` (rows on ``data``, heads on ``model``); the pool is replicated
because its indices are global (one pool per shard is not done).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvlab.lib.sharding import to_host


@struct.dataclass
class PagedStore:
  """Pages of kept tokens, listed per (layer, row, head) (shapes in the module docstring)."""

  k_pages: jax.Array
  v_pages: jax.Array
  positions: jax.Array
  page_table: jax.Array
  lengths: jax.Array
  page: int = struct.field(pytree_node=False, default=16)

  # ---- the stored-part protocol of KVCache.quant ------------------------------------------
  @property
  def capacity(self) -> int:
    """Slots addressable per head (``M * P``); only listed pages are stored."""
    return self.page_table.shape[3] * self.page

  @property
  def group(self) -> int:
    """Attention reads whole pages: blocks start at and span multiples of this."""
    return self.page

  def trimmed(self) -> "PagedStore":
    """Already holds only what is kept."""
    return self

  def grown(self, slots: int) -> "PagedStore":
    """Tokens appended later go to the cache's full-precision window, not to the pages."""
    del slots
    return self

  def read(self, layer, start, size: int):
    """``(keys, values [B, K, size, H] float32, positions [B, K, size])`` of slots ``[start,
    start + size)`` of ``layer`` (``start``, ``size`` multiples of the page): one gather of whole
    pages. Slots past a head's length hold other data; callers mask them by ``lengths``."""
    p = self.page
    table = jax.lax.dynamic_index_in_dim(self.page_table, layer, 0, keepdims=False)  # [B, K, M]
    table = jax.lax.dynamic_slice_in_dim(table, start // p, size // p, axis=2)
    b, k, _ = table.shape
    h = self.k_pages.shape[-1]
    f32 = jnp.float32
    return (self.k_pages[table].reshape(b, k, size, h).astype(f32),
            self.v_pages[table].reshape(b, k, size, h).astype(f32),
            self.positions[table].reshape(b, k, size))

  # ---- views ----------------------------------------------------------------------------
  def page_valid(self, layer) -> jax.Array:
    """``[B, K, M]`` valid tokens in each listed page of ``layer`` (0 = unused entry)."""
    lengths = jax.lax.dynamic_index_in_dim(self.lengths, layer, 0, keepdims=False)
    m = self.page_table.shape[3]
    return jnp.clip(lengths[..., None] - jnp.arange(m) * self.page, 0, self.page).astype(jnp.int32)

  def kernel_inputs(self, layer):
    """``(k_pages, v_pages [N, P, H], page_table, page_valid [B, K, M])`` of ``layer``: the
    arguments of ``paged_decode_attention`` after ``q``, read in place."""
    table = jax.lax.dynamic_index_in_dim(self.page_table, layer, 0, keepdims=False)
    return self.k_pages, self.v_pages, table, self.page_valid(layer)

  def kernel_attention(self, layer, q, *, interpret: bool = False):
    """``(o [B, K, G, H], lse [B, K, G])`` of queries ``q [B, K, G, H]`` over this layer's pages
    by the Pallas kernel (``lib.attention`` merges them into the decode step)."""
    from kvlab.pallas_kernels.sparse_decode_attention import paged_decode_attention  # pylint: disable=g-import-not-at-top
    return paged_decode_attention(q, *self.kernel_inputs(layer), interpret=interpret,
                                  return_lse=True)

  def dense(self):
    """``(keys, values [L, B, K, M*P, H], positions [L, B, K, M*P])``: the padded layout again
    (positions -1 past each head's length), for tests and for converting back."""
    l, b, k, m = self.page_table.shape
    p, h = self.page, self.k_pages.shape[-1]
    keys = self.k_pages[self.page_table].reshape(l, b, k, m * p, h)
    values = self.v_pages[self.page_table].reshape(l, b, k, m * p, h)
    pos = self.positions[self.page_table].reshape(l, b, k, m * p)
    pos = jnp.where(jnp.arange(m * p) < self.lengths[..., None], pos, -1)
    return keys, values, pos


def build(keys, values, positions, lengths, *, page: int, block: int = 512,
          host_lengths: np.ndarray | None = None) -> PagedStore:
  """Pages of a padded cache (host-level: the pool size depends on the lengths).

  Args:
    keys, values: ``[L, B, K, S, H]`` with each head's valid slots first.
    positions: ``[L, B, K, S]`` int32; ``lengths [L, B, K]`` valid slots per head.
    page: slots per page (P).
    block: the model's attention block; the table is padded to a multiple of ``block / P``
      entries (int32s, not pages) so attention reads blocks of ``block`` slots.
    host_lengths: ``lengths`` as numpy when the caller has them (``methods.compress`` sized the
      cache from them): no wait for the device to size the pool.

  Returns:
    A ``PagedStore`` with ``N = max(1, sum ceil(lengths / P))`` pages.
  """
  if page < 1:
    raise ValueError(f"page must be >= 1 slot, got {page}")
  host = to_host(lengths) if host_lengths is None else np.asarray(host_lengths)
  if host.shape != tuple(lengths.shape):
    raise ValueError(f"host_lengths {host.shape} must match lengths {tuple(lengths.shape)}")
  need = -(-host.astype(np.int64) // page)  # [L, B, K] pages per head
  flat = need.ravel()
  per_block = max(block // page, 1)
  m = max(int(flat.max()), 1)
  m = -(-m // per_block) * per_block
  s = keys.shape[3]
  per_head = -(-s // page)  # pages of one padded head
  total = int(flat.sum())
  starts = np.cumsum(flat) - flat  # first pool page of each head
  # source page of every pool page (head h's t-th page is page h * per_head + t of the padded
  # cache viewed as pages), and each head's table (own pages first, then page 0)
  src = np.repeat(np.arange(flat.size) * per_head, flat) + (np.arange(total)
                                                           - np.repeat(starts, flat))
  if total == 0:
    src = np.zeros(1, np.int64)
  j = np.arange(m)
  table = np.where(j < flat[:, None], starts[:, None] + j, 0).reshape(need.shape + (m,))
  return _gather(keys, values, positions, jnp.asarray(lengths, jnp.int32),
                 jnp.asarray(src, jnp.int32), jnp.asarray(table, jnp.int32), page=page)


@functools.partial(jax.jit, static_argnames=("page",))
def _gather(keys, values, positions, lengths, src, table, *, page: int) -> PagedStore:
  s = keys.shape[3]
  pad = -s % page
  valid = jnp.arange(s) < lengths[..., None]
  positions = jnp.where(valid, positions, -1)
  as_pages = lambda x, fill: jnp.pad(
      x, [(0, 0)] * 3 + [(0, pad)] + [(0, 0)] * (x.ndim - 4), constant_values=fill
  ).reshape((-1, page) + x.shape[4:])
  return PagedStore(k_pages=as_pages(keys, 0)[src], v_pages=as_pages(values, 0)[src],
                    positions=as_pages(positions, -1)[src], page_table=table,
                    lengths=lengths, page=page)


def page_cache(cache, *, page: int, room: int, block: int = 512,
               host_lengths: np.ndarray | None = None):
  """``cache`` (a plain ``KVCache`` whose heads hold different numbers of tokens) with every
  kept token moved into a ``PagedStore`` and an empty full-precision window of ``room`` slots
  (at least 8) for the tokens appended later. Host-level (``host_lengths``: the cache's
  ``lengths`` as numpy, if known). Returns the new ``KVCache``."""
  from kvlab.lib.cache import round_capacity  # pylint: disable=g-import-not-at-top
  from kvlab.lib.quant.store import check_plain  # pylint: disable=g-import-not-at-top
  check_plain("paged layout", cache)
  store = build(cache.keys, cache.values, cache.positions, cache.lengths, page=page, block=block,
                host_lengths=host_lengths)
  window = cache.resize(round_capacity(room), check=False)
  return window.replace(keys=jnp.zeros_like(window.keys), values=jnp.zeros_like(window.values),
                        positions=jnp.full_like(window.positions, -1),
                        lengths=jnp.zeros_like(window.lengths), scores=None, quant=store)
