"""b-bit integer codes packed into uint32 words along the last axis.

A word holds ``32 // bits`` codes (2 bit: 16, 3 bit: 10 — two bits unused —, 4 bit: 8,
8 bit: 4); code ``i`` of a word sits at bit ``i * bits``. Packing along the head dimension keeps
each token's codes contiguous, which is what a decode kernel reads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SUPPORTED_BITS = (2, 3, 4, 8)


def per_word(bits: int) -> int:
  """Codes per uint32 word."""
  check_bits(bits)
  return 32 // bits


def check_bits(bits: int) -> None:
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"unsupported bit width {bits}: choose one of {SUPPORTED_BITS}")


def check_packable(n: int, bits: int, what: str = "last axis") -> None:
  """Raises unless ``n`` codes fill whole words."""
  w = per_word(bits)
  if n % w:
    raise ValueError(f"{what} of size {n} cannot be packed at {bits} bits: it must be a "
                     f"multiple of {w} (codes per uint32 word); pick bits whose word holds a "
                     f"divisor of {n}, e.g. 4 or 8 bit for head dim 64/128 at 3 bit")


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """``codes [..., n]`` (integers in ``[0, 2**bits)``) -> ``[..., n // (32 // bits)]`` uint32."""
  w = per_word(bits)
  check_packable(codes.shape[-1], bits)
  c = codes.astype(jnp.uint32).reshape(codes.shape[:-1] + (codes.shape[-1] // w, w))
  shifts = (jnp.arange(w, dtype=jnp.uint32) * bits)
  x = c << shifts  # codes occupy disjoint bits: OR-reduce the word's lanes
  return jax.lax.reduce(x, jnp.uint32(0), jax.lax.bitwise_or, (x.ndim - 1,))


def unpack(words: jax.Array, bits: int) -> jax.Array:
  """``[..., m]`` uint32 -> ``[..., m * (32 // bits)]`` uint8 codes."""
  w = per_word(bits)
  shifts = jnp.arange(w, dtype=jnp.uint32) * bits
  mask = jnp.uint32((1 << bits) - 1)
  c = (words[..., None] >> shifts) & mask
  return c.reshape(words.shape[:-1] + (words.shape[-1] * w,)).astype(jnp.uint8)
