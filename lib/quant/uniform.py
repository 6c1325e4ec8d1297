"""Asymmetric min-max uniform quantization in groups (KIVI's quantizer, METHODS.md §3.2).

  scale = (max - min) / (2**b - 1);  q = clamp(round((x - min) / scale), 0, 2**b - 1)
  x_hat = q * scale + min

Groups run along one axis: ``axis=-2`` groups ``group`` consecutive tokens of one channel
(KIVI's per-channel keys), ``axis=-1`` groups ``group`` consecutive channels of one token
(per-token values). Codes are packed along the last axis (``lib.quant.packing``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kvlab.lib.quant import packing


class Quantized(NamedTuple):
  """A group-quantized tensor ``x [..., T, H]``.

  codes: ``[..., T, H // (32 // bits)]`` uint32 packed codes.
  scale, zero: ``[..., T // group, H]`` (``axis=-2``) or ``[..., T, H // group]`` (``axis=-1``),
    in the input's float dtype (zero is the group minimum).
  """

  codes: jax.Array
  scale: jax.Array
  zero: jax.Array


def _grouped(x: jax.Array, group: int, axis: int) -> jax.Array:
  """``[..., T, H]`` -> groups on a new axis right after ``axis`` (size ``group``)."""
  t, h = x.shape[-2:]
  if axis == -2:
    if t % group:
      raise ValueError(f"{t} tokens do not split into groups of {group} (per-channel keys): "
                       "quantize a multiple of the group and keep the rest in the residual")
    return x.reshape(x.shape[:-2] + (t // group, group, h))
  if h % group:
    raise ValueError(f"head dim {h} does not split into groups of {group} channels")
  return x.reshape(x.shape[:-1] + (h // group, group))


def quantize(x: jax.Array, bits: int, group: int, axis: int) -> Quantized:
  """Quantizes ``x [..., T, H]`` in groups of ``group`` along ``axis`` (-2 tokens, -1 channels).

  Returns ``Quantized`` whose dequantization is within ``scale / 2`` of ``x`` elementwise.
  """
  packing.check_bits(bits)
  packing.check_packable(x.shape[-1], bits, "head dim")
  if axis not in (-1, -2):
    raise ValueError(f"axis must be -2 (tokens) or -1 (channels), got {axis}")
  g = _grouped(x.astype(jnp.float32), group, axis)
  red = -2 if axis == -2 else -1
  lo = g.min(red, keepdims=True)
  hi = g.max(red, keepdims=True)
  levels = (1 << bits) - 1
  scale = (hi - lo) / levels
  safe = jnp.where(scale > 0, scale, 1.0)
  q = jnp.clip(jnp.round((g - lo) / safe), 0, levels)
  q = q.reshape(x.shape)
  dt = x.dtype
  return Quantized(codes=packing.pack(q, bits), scale=jnp.squeeze(scale, red).astype(dt),
                   zero=jnp.squeeze(lo, red).astype(dt))


def dequantize(qx: Quantized, bits: int, group: int, axis: int, dtype=jnp.float32) -> jax.Array:
  """Inverse of ``quantize``: ``[..., T, H]`` in ``dtype``."""
  q = packing.unpack(qx.codes, bits).astype(jnp.float32)  # [..., T, H]
  scale, zero = qx.scale.astype(jnp.float32), qx.zero.astype(jnp.float32)
  if axis == -2:
    scale = jnp.repeat(scale, group, axis=-2)
    zero = jnp.repeat(zero, group, axis=-2)
  else:
    scale = jnp.repeat(scale, group, axis=-1)
    zero = jnp.repeat(zero, group, axis=-1)
  return (q * scale + zero).astype(dtype)
