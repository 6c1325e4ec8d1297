"""The quantized part of a KV cache in KVQuant's layout, carried in ``KVCache.quant``.

Letters: L layers, B batch, K kv heads, Q quantized slots, H head dim, C = 2**bits centroids,
n sparse outliers per vector, W packed words per vector (``H * bits / 32``).

* keys, **pre-RoPE, per channel with static ranges**: each key is un-rotated (RoPE by minus
  its position), normalised per (layer, kv head, channel) with calibrated ``k_offset,
  k_range [L, K, H]``, coded against the layer's LUT ``k_lut [L, C]``: ``k_codes
  [L, B, K, Q, W]`` uint32. Reading rotates the dequantized keys by their positions again
  (``inv_freq [H/2]``), so attention sees post-RoPE keys.
* values, **per token with dynamic ranges**: ``v_offset, v_range [L, B, K, Q]`` float16 from
  the token's min/max after its outliers are set aside; ``v_codes [L, B, K, Q, W]`` against
  ``v_lut [L, C]``.
* **dense-and-sparse**: per vector the ``n`` entries farthest from the range centre are kept
  exactly: ``*_out_idx [L, B, K, Q, n]`` uint8 channel and ``*_out_val`` float16 value.
* ``positions [L, B, K, Q]`` (-1 empty), ``lengths [L, B, K]`` valid slots.

Every token is quantized on its own (no token groups); ``group`` is only how many decoded
tokens the full-precision window gathers before they are quantized together (``flush``), a
batching of the rewrite, with ``residual`` tokens always left in full precision (KVQuant keeps
none: default 0); tokens at positions below ``sink`` (attention sinks) stay in the window for
good. The calibration leaves (LUTs, key ranges, ``inv_freq``) are shared by every
row and are counted in ``nbytes`` too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvlab.lib.quant import nuq, packing
from kvlab.lib.quant.store import put_slots
from kvlab.lib.rope import rotate


@struct.dataclass
class KVQuantStore:
  """Packed KVQuant codes of the older cache tokens (see the module docstring for shapes)."""

  k_codes: jax.Array
  k_out_idx: jax.Array
  k_out_val: jax.Array
  v_codes: jax.Array
  v_offset: jax.Array
  v_range: jax.Array
  v_out_idx: jax.Array
  v_out_val: jax.Array
  positions: jax.Array
  lengths: jax.Array
  k_lut: jax.Array
  v_lut: jax.Array
  k_offset: jax.Array
  k_range: jax.Array
  inv_freq: jax.Array
  k_bits: int = struct.field(pytree_node=False, default=3)
  v_bits: int = struct.field(pytree_node=False, default=3)
  group: int = struct.field(pytree_node=False, default=16)
  residual: int = struct.field(pytree_node=False, default=0)
  sink: int = struct.field(pytree_node=False, default=0)

  @property
  def capacity(self) -> int:
    return self.k_codes.shape[3]

  @property
  def n_outliers(self) -> int:
    return self.k_out_idx.shape[-1]

  @classmethod
  def build(cls, keys, values, positions, lengths, *, k_lut, v_lut, k_offset, k_range, inv_freq,
            n_outliers: int, group: int = 16, residual: int = 0,
            sink: int = 0) -> "KVQuantStore":
    """Quantizes post-RoPE ``keys`` and ``values [L, B, K, Q, H]`` at ``positions
    [L, B, K, Q]``; slots at or beyond ``lengths [L, B, K]`` are kept out (positions -1).

    ``k_lut, v_lut [L, C]`` sorted centroids in [-1, 1]; ``k_offset, k_range [L, K, H]`` the
    calibrated per-channel centre and half-width of pre-RoPE keys; ``inv_freq [H/2]``.
    """
    k_bits = _bits_of(k_lut)
    v_bits = _bits_of(v_lut)
    h = keys.shape[-1]
    for bits in (k_bits, v_bits):
      packing.check_packable(h, bits, "head dim")
    valid = jnp.arange(keys.shape[3]) < lengths[..., None]
    positions = jnp.where(valid, positions, -1)
    codes = jax.vmap(nuq.encode)  # over layers: [L, ...] values, [L, C] LUTs

    # keys: pre-RoPE, static per-channel range, largest |normalised| entries sparse
    k_pre = rotate(keys, -jnp.maximum(positions, 0), inv_freq)
    off, rng = k_offset[:, None, :, None, :], k_range[:, None, :, None, :]
    u = (k_pre - off) / rng
    k_idx, k_dense = nuq.split_outliers(u, n_outliers)
    k_val = jnp.take_along_axis(k_pre, k_idx.astype(jnp.int32), axis=-1)

    # values: per-token dynamic range after setting the outliers aside (replaced by the median)
    v = values.astype(jnp.float32)
    med = jnp.median(v, axis=-1, keepdims=True)
    v_idx, hit = nuq.top_outliers(jnp.abs(v - med), n_outliers)
    rest = jnp.where(hit, med, v)
    lo, hi = rest.min(-1), rest.max(-1)
    v_off = (hi + lo) * 0.5
    v_rng = jnp.maximum((hi - lo) * 0.5, 1e-6)
    # offsets and ranges are stored in float16: code against the stored ones
    v_off, v_rng = v_off.astype(jnp.float16), v_rng.astype(jnp.float16)
    vu = (v - v_off[..., None].astype(jnp.float32)) / v_rng[..., None].astype(jnp.float32)
    v_dense = jnp.clip(jnp.where(hit, 0.0, vu), -1.0, 1.0)
    v_val = jnp.take_along_axis(v, v_idx.astype(jnp.int32), axis=-1)

    return cls(
        k_codes=packing.pack(codes(k_dense, k_lut), k_bits),
        k_out_idx=k_idx, k_out_val=k_val.astype(jnp.float16),
        v_codes=packing.pack(codes(v_dense, v_lut), v_bits),
        v_offset=v_off, v_range=v_rng, v_out_idx=v_idx, v_out_val=v_val.astype(jnp.float16),
        positions=positions, lengths=lengths.astype(jnp.int32),
        k_lut=k_lut.astype(jnp.float32), v_lut=v_lut.astype(jnp.float32),
        k_offset=k_offset.astype(jnp.float32), k_range=k_range.astype(jnp.float32),
        inv_freq=inv_freq.astype(jnp.float32), k_bits=k_bits, v_bits=v_bits, group=group,
        residual=residual, sink=sink)

  def _per_slot(self):
    return ("k_codes", "k_out_idx", "k_out_val", "v_codes", "v_offset", "v_range", "v_out_idx",
            "v_out_val", "positions")

  def grown(self, slots: int) -> "KVQuantStore":
    """``slots`` more free slots (rounded up to whole flush groups) for tokens flushed later."""
    n = -(-slots // self.group) * self.group
    def pad(x, v=0):
      return jnp.pad(x, [(0, 0)] * 3 + [(0, n)] + [(0, 0)] * (x.ndim - 4), constant_values=v)
    new = {f: pad(getattr(self, f), -1 if f == "positions" else 0) for f in self._per_slot()}
    return self.replace(**new)

  def trimmed(self) -> "KVQuantStore":
    """The same contents with no free slots (host-level; for reporting kept bytes)."""
    g = self.group
    n = max(-(-int(jnp.max(self.lengths)) // g) * g, g)
    return self.replace(**{f: getattr(self, f)[:, :, :, :n] for f in self._per_slot()})

  def read(self, layer, start, size: int):
    """Dequantized ``(keys (post-RoPE), values [B, K, size, H] float32, positions
    [B, K, size])`` of slots ``[start, start + size)`` of ``layer``."""
    sl = lambda x: jax.lax.dynamic_slice_in_dim(
        jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False), start, size, axis=2)
    at = lambda x: jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
    pos = sl(self.positions)
    k_lut, v_lut = at(self.k_lut), at(self.v_lut)
    ku = nuq.decode(packing.unpack(sl(self.k_codes), self.k_bits), k_lut)  # [B, K, size, H]
    k_pre = ku * at(self.k_range)[None, :, None, :] + at(self.k_offset)[None, :, None, :]
    k_pre = nuq.overlay(k_pre, sl(self.k_out_idx), sl(self.k_out_val).astype(jnp.float32))
    keys = rotate(k_pre, jnp.maximum(pos, 0), self.inv_freq)
    vu = nuq.decode(packing.unpack(sl(self.v_codes), self.v_bits), v_lut)
    vals = (vu * sl(self.v_range).astype(jnp.float32)[..., None]
            + sl(self.v_offset).astype(jnp.float32)[..., None])
    vals = nuq.overlay(vals, sl(self.v_out_idx), sl(self.v_out_val).astype(jnp.float32))
    return keys, vals, pos

  def insert(self, keys, values, positions, when) -> "KVQuantStore":
    """Quantizes ``keys, values [L, B, K, group, H]`` (post-RoPE, ``positions [L, B, K,
    group]``) and writes them after the valid slots of the heads where ``when [L, B, K]``."""
    g = self.group
    new = KVQuantStore.build(keys, values, positions, jnp.full(when.shape, g, jnp.int32),
                             k_lut=self.k_lut, v_lut=self.v_lut, k_offset=self.k_offset,
                             k_range=self.k_range, inv_freq=self.inv_freq,
                             n_outliers=self.n_outliers, group=g, residual=self.residual,
                             sink=self.sink)
    at = jnp.minimum(self.lengths, self.capacity - g)
    upd = {f: put_slots(getattr(self, f), getattr(new, f), at, when) for f in self._per_slot()}
    return self.replace(**upd, lengths=jnp.where(when, self.lengths + g, self.lengths))


def _bits_of(lut: jax.Array) -> int:
  c = lut.shape[-1]
  bits = c.bit_length() - 1
  if 1 << bits != c:
    raise ValueError(f"a LUT of {c} centroids is not a power of two")
  packing.check_bits(bits)
  return bits
