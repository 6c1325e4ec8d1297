"""The quantized part of a KV cache (KIVI layout), carried in ``KVCache.quant``.

A quantized cache splits each (layer, row, head) into an older quantized part (this store) and
the newest tokens in full precision (``KVCache.keys/values``, the residual window). Letters:
L layers, B batch, K kv heads, Q quantized slots, H head dim, w = 32 // bits codes per word,
G the group size.

* keys per channel, groups of G tokens: ``k_codes [L, B, K, Q, H/w]`` uint32,
  ``k_scale, k_zero [L, B, K, Q/G, H]``;
* values per token, groups of G channels: ``v_codes [L, B, K, Q, H/w]``,
  ``v_scale, v_zero [L, B, K, Q, H/G]``;
* ``positions [L, B, K, Q]`` original positions (-1 empty), ``lengths [L, B, K]`` valid slots
  (a multiple of G: keys are quantized in whole groups).

Scales and zero-points are stored in float16 (as KIVI does); everything counts in ``nbytes``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from kvlab.lib.quant import packing
from kvlab.lib.quant.uniform import Quantized, dequantize, quantize
from kvlab.lib.sharding import to_host


@struct.dataclass
class QuantStore:
  """Packed KIVI codes of the older cache tokens (see the module docstring for shapes)."""

  k_codes: jax.Array
  k_scale: jax.Array
  k_zero: jax.Array
  v_codes: jax.Array
  v_scale: jax.Array
  v_zero: jax.Array
  positions: jax.Array
  lengths: jax.Array
  k_bits: int = struct.field(pytree_node=False, default=2)
  v_bits: int = struct.field(pytree_node=False, default=2)
  group: int = struct.field(pytree_node=False, default=32)
  residual: int = struct.field(pytree_node=False, default=128)

  @property
  def capacity(self) -> int:
    return self.k_codes.shape[3]

  @classmethod
  def build(cls, keys, values, positions, lengths, *, k_bits: int, v_bits: int, group: int,
            residual: int = 128, scale_dtype=jnp.float16) -> "QuantStore":
    """Quantizes ``keys, values [L, B, K, Q, H]`` (Q a multiple of ``group``); slots at or
    beyond ``lengths [L, B, K]`` are kept out (their positions are -1). ``residual`` is the
    full-precision window the decode loop keeps (``flush``)."""
    kq = quantize(keys, k_bits, group, -2)
    vq = quantize(values, v_bits, group, -1)
    valid = jnp.arange(keys.shape[3]) < lengths[..., None]
    return cls(k_codes=kq.codes, k_scale=kq.scale.astype(scale_dtype),
               k_zero=kq.zero.astype(scale_dtype), v_codes=vq.codes,
               v_scale=vq.scale.astype(scale_dtype), v_zero=vq.zero.astype(scale_dtype),
               positions=jnp.where(valid, positions, -1), lengths=lengths.astype(jnp.int32),
               k_bits=k_bits, v_bits=v_bits, group=group, residual=residual)

  def grown(self, slots: int) -> "QuantStore":
    """``slots`` more free slots (rounded up to whole groups) for tokens flushed later."""
    g = self.group
    n = -(-slots // g) * g
    pad = lambda x, m, v=0: jnp.pad(x, [(0, 0)] * 3 + [(0, m)] + [(0, 0)] * (x.ndim - 4),
                                    constant_values=v)
    return self.replace(
        k_codes=pad(self.k_codes, n), k_scale=pad(self.k_scale, n // g),
        k_zero=pad(self.k_zero, n // g), v_codes=pad(self.v_codes, n),
        v_scale=pad(self.v_scale, n), v_zero=pad(self.v_zero, n),
        positions=pad(self.positions, n, -1))

  def trimmed(self) -> "QuantStore":
    """The same contents with no free slots (host-level; for reporting kept bytes)."""
    g = self.group
    n = max(-(-int(jnp.max(self.lengths)) // g) * g, g)
    cut = lambda x, m: x[:, :, :, :m]
    return self.replace(k_codes=cut(self.k_codes, n), k_scale=cut(self.k_scale, n // g),
                        k_zero=cut(self.k_zero, n // g), v_codes=cut(self.v_codes, n),
                        v_scale=cut(self.v_scale, n), v_zero=cut(self.v_zero, n),
                        positions=cut(self.positions, n))

  def read(self, layer, start, size: int):
    """Dequantized ``(keys, values [B, K, size, H] float32, positions [B, K, size])`` of slots
    ``[start, start + size)`` of ``layer`` (``start`` and ``size`` multiples of the group)."""
    g = self.group
    sl = lambda x, s, n: jax.lax.dynamic_slice_in_dim(
        jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False), s, n, axis=2)
    kq = Quantized(sl(self.k_codes, start, size), sl(self.k_scale, start // g, size // g),
                   sl(self.k_zero, start // g, size // g))
    vq = Quantized(sl(self.v_codes, start, size), sl(self.v_scale, start, size),
                   sl(self.v_zero, start, size))
    return (dequantize(kq, self.k_bits, g, -2), dequantize(vq, self.v_bits, g, -1),
            sl(self.positions, start, size))

  def kernel_attention(self, layer, q, *, interpret: bool = False):
    """``(o [B, K, G, H], lse [B, K, G])`` of queries ``q [B, K, G, H]`` over this layer's
    packed codes by the Pallas kernel, which dequantizes in registers (the full-precision window
    is folded in by ``lib.attention``, so the kernel's own residual input is left empty)."""
    from kvlab.pallas_kernels.quantized_decode_attention import quantized_decode_attention  # pylint: disable=g-import-not-at-top
    at = lambda x: jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
    b, k, g, h = q.shape
    if self.k_bits != self.v_bits:
      raise ValueError("the quantized kernel takes one bit width for keys and values")
    empty = jnp.zeros((b, k, 8, h), q.dtype)
    grp = self.group
    block = grp * math.gcd(max(128 // grp, 1), self.capacity // grp)
    return quantized_decode_attention(
        q, at(self.k_codes), at(self.k_scale), at(self.k_zero), at(self.v_codes),
        at(self.v_scale), at(self.v_zero), at(self.lengths), empty, empty,
        jnp.zeros((b, k), jnp.int32), bits=self.k_bits, group=grp, block=block,
        interpret=interpret, return_lse=True)

  def insert(self, keys, values, positions, when) -> "QuantStore":
    """Quantizes one group ``keys, values [L, B, K, group, H]`` (``positions [L, B, K,
    group]``) and writes it after the valid slots of the heads where ``when [L, B, K]``."""
    g = self.group
    new = QuantStore.build(keys, values, positions, jnp.full(when.shape, g, jnp.int32),
                           k_bits=self.k_bits, v_bits=self.v_bits, group=g,
                           residual=self.residual, scale_dtype=self.k_scale.dtype)
    at = jnp.minimum(self.lengths, self.capacity - g)  # where the group goes (a multiple of g)
    put = lambda buf, piece, start: put_slots(buf, piece, start, when)
    return self.replace(
        k_codes=put(self.k_codes, new.k_codes, at), k_scale=put(self.k_scale, new.k_scale, at // g),
        k_zero=put(self.k_zero, new.k_zero, at // g), v_codes=put(self.v_codes, new.v_codes, at),
        v_scale=put(self.v_scale, new.v_scale, at), v_zero=put(self.v_zero, new.v_zero, at),
        positions=put(self.positions, new.positions, at),
        lengths=jnp.where(when, self.lengths + g, self.lengths))


def flush(cache):
  """Decode-time streaming of any quantized store (KIVI's ``QuantStore``, KVQuant's
  ``KVQuantStore``): where a head's full-precision window holds ``residual + group`` tokens
  (besides its attention sinks), its oldest ``group`` non-sink tokens are quantized into the
  store (``store.insert``) and the later ones shift left by ``group``. Jittable; one group per
  call (called after every decoded token, so the window stays below ``residual + group``).

  ``cache`` is a ``KVCache`` with ``quant`` set; the store must have a free group of slots
  (the method's ``apply`` allocates them for the tokens it was told to leave room for). A store
  with ``sink > 0`` (KVQuant) keeps tokens at positions below ``sink`` at the front of the
  window for good.
  """
  q = cache.quant
  g = q.group
  skip = sink_slots(cache.positions, getattr(q, "sink", 0))  # [L, B, K]
  # Heads whose window is full flush, if the store has a free group (else the window grows).
  when = (cache.lengths - skip >= q.residual + g) & (q.lengths + g <= q.capacity)  # [L, B, K]
  # Most decode steps flush nothing: skip the whole rewrite then (it touches every buffer).
  return jax.lax.cond(when.any(), lambda c: _flush(c, when, skip), lambda c: c, cache)


def sink_slots(positions: jax.Array, sink: int) -> jax.Array:
  """``[L, B, K]`` slots holding tokens at positions ``[0, sink)`` (they come first)."""
  if sink == 0:
    return jnp.zeros(positions.shape[:3], jnp.int32)
  return jnp.sum((positions >= 0) & (positions < sink), axis=-1).astype(jnp.int32)


def take_slots(x: jax.Array, start: jax.Array, n: int) -> jax.Array:
  """Slots ``[start, start + n)`` (``start [L, B, K]``) of a leaf ``[L, B, K, S, ...]``; slots
  past S repeat the last one (callers mask them by length)."""
  idx = jnp.minimum(start[..., None] + jnp.arange(n), x.shape[3] - 1)
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 4))
  return jnp.take_along_axis(x, idx, axis=3)


def _flush(cache, when, skip):
  g = cache.quant.group
  piece = lambda x: take_slots(x, skip, g)
  store = cache.quant.insert(piece(cache.keys), piece(cache.values), piece(cache.positions),
                             when)
  cap = cache.capacity
  j = jnp.arange(cap)
  moved = jnp.where(j < skip[..., None], j, j + jnp.where(when, g, 0)[..., None])
  idx = jnp.minimum(moved, cap - 1)
  lengths = jnp.where(when, cache.lengths - g, cache.lengths)
  keep = j < lengths[..., None]
  shift = lambda x: jnp.take_along_axis(x, idx[..., None], axis=3)
  return cache.replace(keys=shift(cache.keys), values=shift(cache.values),
                       positions=jnp.where(keep, jnp.take_along_axis(cache.positions, idx, 3), -1),
                       lengths=lengths, quant=store)


def put_slots(buf, piece, start, when):
  """Writes ``piece [L, B, K, s, ...]`` into ``buf [L, B, K, S, ...]`` at slot ``start
  [L, B, K]`` for the heads where ``when [L, B, K]``; the others keep ``buf``."""
  def one(b, p, s0):
    return jax.lax.dynamic_update_slice_in_dim(b, p.astype(b.dtype), s0, axis=0)
  wrote = jax.vmap(jax.vmap(jax.vmap(one)))(buf, piece, start)
  w = when.reshape(when.shape + (1,) * (buf.ndim - 3))
  return jnp.where(w, wrote, buf)


def check_plain(name: str, cache) -> None:
  """One stored part per cache: raises if ``cache`` is already quantized / low-rank / pruned
  (compose ``eviction+X``, with X last, instead of stacking two such methods)."""
  if cache.quant is not None:
    raise ValueError(f"{name}: the cache already has a stored part "
                     f"({type(cache.quant).__name__}); a cache takes one quantizer / low-rank / "
                     "channel-pruning method, composed last after eviction")


def check_uniform_tokens(name: str, why: str, cache) -> int:
  """Clear error unless every layer and head of ``cache`` holds the same tokens (cross-layer and
  cross-head methods: xKV, MiniCache); ``why`` says what needs it. Returns the longest row."""
  pos = to_host(cache.positions)
  lengths = to_host(cache.lengths)
  if not ((pos == pos[:1, :, :1]).all() and (lengths == lengths[:1, :, :1]).all()):
    raise ValueError(f"{name} needs the same tokens in every layer and head ({why}): apply it "
                     "to the full cache or after streaming_llm, not after a per-head eviction")
  return int(lengths.max())


def check_window(name: str, group: int, residual: int) -> None:
  """Clear error unless ``residual`` (full-precision tokens) is a non-negative multiple of the
  flush ``group``."""
  if group < 1 or residual < 0 or residual % group:
    raise ValueError(f"{name}: residual ({residual}) must be a non-negative multiple of group "
                     f"({group})")


def first_slots(x: jax.Array, n: int) -> jax.Array:
  """Slots ``[0, n)`` of a cache leaf ``[L, B, K, S, ...]``, padded past S with 0 (float
  leaves) or -1 (integer leaves: positions, so padded slots read as empty)."""
  s = x.shape[3]
  if n <= s:
    return x[:, :, :, :n]
  fill = -1 if jnp.issubdtype(x.dtype, jnp.signedinteger) else 0
  return jnp.pad(x, [(0, 0)] * 3 + [(0, n - s)] + [(0, 0)] * (x.ndim - 4), constant_values=fill)


def split_window(cache, n_q: jax.Array, res_cap: int, quant, skip: jax.Array | None = None):
  """The cache whose full-precision part keeps each head's first ``skip [L, B, K]`` slots
  (sinks; default none) and its slots from ``skip + n_q`` on, moved to the front of ``res_cap``
  slots, with ``quant`` (the store of the ``n_q [L, B, K]`` slots in between)."""
  skip = jnp.zeros_like(n_q) if skip is None else skip
  res_len = cache.lengths - n_q
  j = jnp.arange(res_cap)
  idx = jnp.where(j < skip[..., None], j, n_q[..., None] + j)
  idx = jnp.minimum(idx, cache.capacity - 1)  # [L, B, K, R]
  take = lambda x: jnp.take_along_axis(x, idx[..., None], axis=3)
  in_res = j < res_len[..., None]
  return cache.replace(
      keys=jnp.where(in_res[..., None], take(cache.keys), 0).astype(cache.keys.dtype),
      values=jnp.where(in_res[..., None], take(cache.values), 0).astype(cache.values.dtype),
      positions=jnp.where(in_res, jnp.take_along_axis(cache.positions, idx, axis=3), -1),
      lengths=res_len, scores=None, quant=quant)


def check_head_dim(head_dim: int, k_bits: int, v_bits: int, group: int) -> None:
  """Clear errors for settings the layout cannot hold."""
  for bits in (k_bits, v_bits):
    packing.check_packable(head_dim, bits, "head dim")
  if head_dim % group:
    raise ValueError(f"group {group} must divide the head dim {head_dim} (values are grouped "
                     "along channels)")
