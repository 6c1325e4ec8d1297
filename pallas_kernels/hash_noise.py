"""Keyformer's Gumbel noise from a uint32 hash of its coordinates, the part a kernel computes
itself (``column_sums``): the hash's finaliser to a uniform, and ``-log(-log u)``.

``lib.gumbel`` builds the hash from (seed, layer, head, query and key positions) and re-exports
these, so the XLA paths and the kernel add the same noise to the same logit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def uniform_of_hash(h: jax.Array) -> jax.Array:
  """Uniform float32 in ``[2^-24, 1 - 2^-24]`` (never 0 or 1) from a uint32 hash: murmur3's
  finaliser (every input bit reaches every output bit), then its top 23 bits."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  h = h ^ (h >> 16)
  # 23 bits: ``x + 0.5`` is exact in float32 for every x < 2^23, so u < 1 always. With 24 bits
  # (before 2026-11-27) the largest hash gave 2^24 - 0.5, which float32 rounds to 2^24: u = 1,
  # -log u = 0, an infinite Gumbel weight for 1 query-key pair in 2^24 (about 135 per 4k prompt
  # over SmolLM2's 30 layers x 9 heads), and NaN column sums where it landed.
  return ((h >> 9).astype(jnp.float32) + 0.5) * (1.0 / (1 << 23))


def neg_log(u: jax.Array) -> jax.Array:
  """``-log u``, at least 2^-25 whatever a backend's log does near 1."""
  return jnp.maximum(-jnp.log(u), 2.0 ** -25)


def noise_of_hash(h: jax.Array) -> jax.Array:
  """``G = -log(-log u)`` for ``u = uniform_of_hash(h)`` (as ``gumbel_noise``)."""
  return -jnp.log(neg_log(uniform_of_hash(h)))
