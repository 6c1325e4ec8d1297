"""b-bit integer codes packed densely into uint32 words along the last axis.

The codes form one little-endian bit stream: code ``i`` occupies bits ``[i*bits, (i+1)*bits)``
of the stream, word ``j`` holds stream bits ``[32j, 32j+32)``. For 2, 4 and 8 bits a word holds
``32 // bits`` whole codes (code ``i`` of a word at bit ``i * bits``); a 3-bit code may straddle
two words, and 32 codes fill exactly 3 words, so 3 bits cost 3 bits (head dim 64 or 128 packs
at every supported width). Packing along the head dimension keeps each token's codes
contiguous, which is what a decode kernel reads.

Lives with the kernels that unpack it (``quantized_decode_attention``); ``lib.quant.packing``
re-exports it for the stores and methods that pack.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
  """Raises a ValueError listing the supported widths unless ``bits`` is one of them."""
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"unsupported bit width {bits}: choose one of {SUPPORTED_BITS}")


def period(bits: int) -> tuple[int, int]:
  """``(codes, words)`` of the smallest whole-word run: (16, 1) at 2 bit, (32, 3) at 3 bit."""
  check_bits(bits)
  codes = 32 // math.gcd(32, bits)
  return codes, codes * bits // 32


def per_word(bits: int) -> int:
  """Codes per uint32 word for widths dividing 32 (2, 4, 8); 3-bit codes straddle words."""
  codes, words = period(bits)
  if words != 1:
    raise ValueError(f"{bits}-bit codes do not fit whole words; use period({bits})")
  return codes


def packed_size(n: int, bits: int) -> int:
  """Words holding ``n`` codes (``n`` must fill whole words, see ``check_packable``)."""
  check_packable(n, bits)
  return n * bits // 32


def check_packable(n: int, bits: int, what: str = "last axis") -> None:
  """Raises unless ``n`` codes fill whole words."""
  codes, _ = period(bits)
  if n % codes:
    raise ValueError(f"{what} of size {n} cannot be packed at {bits} bits: it must be a "
                     f"multiple of {codes} (codes per whole run of uint32 words); head dims "
                     f"64 and 128 pack at every supported width")


def _layout(bits: int):
  codes, words = period(bits)
  off = np.arange(codes) * bits
  word, shift = off // 32, off % 32
  spans = shift + bits > 32  # the code's high bits continue in the next word
  return codes, words, word, shift, spans


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """``codes [..., n]`` (integers in ``[0, 2**bits)``) -> ``[..., n * bits // 32]`` uint32."""
  check_packable(codes.shape[-1], bits)
  p, w, word, shift, spans = _layout(bits)
  c = codes.astype(jnp.uint32).reshape(codes.shape[:-1] + (codes.shape[-1] // p, p))
  lo = c << jnp.asarray(shift, jnp.uint32)  # bits past 32 fall off: they go to the next word
  hi = jnp.where(spans, c >> jnp.asarray(np.where(spans, 32 - shift, 0), jnp.uint32), 0)
  # Codes occupy disjoint bits, so a sum is their OR.
  to_lo = jnp.asarray(word[:, None] == np.arange(w)[None, :])         # [p, w]
  to_hi = jnp.asarray((word[:, None] + 1 == np.arange(w)[None, :]) & spans[:, None])
  out = (jnp.where(to_lo, lo[..., None], jnp.uint32(0)).sum(-2, dtype=jnp.uint32)
         + jnp.where(to_hi, hi[..., None], jnp.uint32(0)).sum(-2, dtype=jnp.uint32))
  return out.reshape(codes.shape[:-1] + (codes.shape[-1] * bits // 32,))


def unpack(words: jax.Array, bits: int) -> jax.Array:
  """``[..., m]`` uint32 -> ``[..., m * 32 // bits]`` uint8 codes."""
  p, w, word, shift, spans = _layout(bits)
  if words.shape[-1] % w:
    raise ValueError(f"{words.shape[-1]} words do not hold whole {bits}-bit runs of {w} words")
  x = words.reshape(words.shape[:-1] + (words.shape[-1] // w, w))
  mask = jnp.uint32((1 << bits) - 1)
  lo = x[..., word] >> jnp.asarray(shift, jnp.uint32)
  if spans.any():
    nxt = x[..., np.minimum(word + 1, w - 1)] << jnp.asarray(np.where(spans, 32 - shift, 0),
                                                             jnp.uint32)
    lo = lo | jnp.where(spans, nxt, jnp.uint32(0))
  c = lo & mask
  return c.reshape(words.shape[:-1] + (words.shape[-1] // w * p,)).astype(jnp.uint8)
