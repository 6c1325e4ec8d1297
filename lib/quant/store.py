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

import jax
import jax.numpy as jnp
from flax import struct

from lib.quant import packing
from lib.quant.uniform import Quantized, dequantize, quantize


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

  @property
  def capacity(self) -> int:
    return self.k_codes.shape[3]

  @classmethod
  def build(cls, keys, values, positions, lengths, *, k_bits: int, v_bits: int, group: int,
            scale_dtype=jnp.float16) -> "QuantStore":
    """Quantizes ``keys, values [L, B, K, Q, H]`` (Q a multiple of ``group``); slots at or
    beyond ``lengths [L, B, K]`` are kept out (their positions are -1)."""
    kq = quantize(keys, k_bits, group, -2)
    vq = quantize(values, v_bits, group, -1)
    valid = jnp.arange(keys.shape[3]) < lengths[..., None]
    return cls(k_codes=kq.codes, k_scale=kq.scale.astype(scale_dtype),
               k_zero=kq.zero.astype(scale_dtype), v_codes=vq.codes,
               v_scale=vq.scale.astype(scale_dtype), v_zero=vq.zero.astype(scale_dtype),
               positions=jnp.where(valid, positions, -1), lengths=lengths.astype(jnp.int32),
               k_bits=k_bits, v_bits=v_bits, group=group)

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


def check_head_dim(head_dim: int, k_bits: int, v_bits: int, group: int) -> None:
  """Clear errors for settings the layout cannot hold."""
  for bits in (k_bits, v_bits):
    packing.check_packable(head_dim, bits, "head dim")
  if head_dim % group:
    raise ValueError(f"group {group} must divide the head dim {head_dim} (values are grouped "
                     "along channels)")
