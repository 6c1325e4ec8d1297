"""One dequantized block of a KIVI store inside a decode kernel, shared by the GPU and TPU
variants (they differ only in how codes are unpacked and value scales laid onto channels)."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl


def dequantized_block(j, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, *, block: int,
                      group: int, codes, per_channel):
  """Slots ``[j * block, (j + 1) * block)``: ``(t0, keys [block, H], values [block, H])`` in
  float32. ``codes``: packed words ``[block, H/w]`` -> codes ``[block, H]``; ``per_channel``:
  value scales ``[block, H/group]`` -> ``[block, H]`` in the same channel order. Key scales
  ``[block/group, H]`` are per channel, repeated over each group of tokens."""
  f32 = jnp.float32
  t0 = pl.multiple_of(j * block, block)
  g0 = pl.multiple_of(j * (block // group), block // group)
  ks = ks_ref[pl.ds(g0, block // group), :].astype(f32)
  kz = kz_ref[pl.ds(g0, block // group), :].astype(f32)
  keys = (codes(kc_ref[pl.ds(t0, block), :]) * jnp.repeat(ks, group, 0)
          + jnp.repeat(kz, group, 0))
  vs = vs_ref[pl.ds(t0, block), :].astype(f32)
  vz = vz_ref[pl.ds(t0, block), :].astype(f32)
  vals = codes(vc_ref[pl.ds(t0, block), :]) * per_channel(vs) + per_channel(vz)
  return t0, keys, vals
