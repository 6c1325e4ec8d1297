"""What the decode-attention kernels return, shared by both of them."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def decode_outputs(row, b: int, k: int, g: int, h: int, return_lse: bool):
  """``(out_specs, out_shape)`` for ``pl.pallas_call`` over a ``(B, K)`` grid: the output
  ``[B, K, G, H]`` float32 and, with ``return_lse``, each query's log normaliser ``[B, K, G]``.
  ``row(*tail)`` is the kernel's per-(b, k) ``BlockSpec`` factory."""
  out = jax.ShapeDtypeStruct((b, k, g, h), jnp.float32)
  if not return_lse:
    return row(g, h), out
  return [row(g, h), row(g)], [out, jax.ShapeDtypeStruct((b, k, g), jnp.float32)]
