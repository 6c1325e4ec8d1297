"""What the GPU decode-attention kernels return, shared by both of them: split-K partials over a
``(B, K, partitions)`` grid, and their merge into the output and its log normaliser."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def partial_outputs(b: int, k: int, parts: int, g: int, h: int):
  """``(out_specs, out_shape)`` for a split-K call over a ``(B, K, partitions)`` grid: each
  program's unnormalised output ``[B, K, P, G, H]``, running max and normaliser ``[B, K, P, G]``,
  all float32 (``merge_partitions`` turns them into the output)."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  spec = lambda *tail: pl.BlockSpec((None, None, None) + tail,
                                    lambda i, j, p: (i, j, p) + (0,) * len(tail))
  f32 = jnp.float32
  return ([spec(g, h), spec(g), spec(g)],
          [jax.ShapeDtypeStruct((b, k, parts, g, h), f32),
           jax.ShapeDtypeStruct((b, k, parts, g), f32),
           jax.ShapeDtypeStruct((b, k, parts, g), f32)])


def merge_partitions(acc, m, l, neg: float = -1e30):
  """Merges per-partition online-softmax states ``acc [B, K, P, G, H]``, ``m, l [B, K, P, G]``
  into the output ``[B, K, G, H]`` and the log normaliser ``[B, K, G]`` (``neg`` where nothing
  was valid, and the output 0 there)."""
  mx = m.max(2)
  wgt = jnp.where(l > 0, jnp.exp(m - mx[:, :, None]), 0.0)
  tot = (l * wgt).sum(2)
  out = (acc * wgt[..., None]).sum(2) / jnp.maximum(tot, 1e-30)[..., None]
  return out, jnp.where(tot > 0, mx + jnp.log(jnp.maximum(tot, 1e-30)), neg)
