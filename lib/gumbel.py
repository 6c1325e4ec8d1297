"""Keyformer's Gumbel noise as a pure function of its coordinates (no stored noise).

The attention pass (``lib.attention``, when a hook asks for Gumbel-softmax probabilities) and the
Keyformer hook's own blockwise pass (``lib.methods.accumulated``) both call it, so they add the
same noise to the same logit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The hash finaliser and the noise of a hash live beside the kernel that also draws them
# (lib -> pallas_kernels); re-exported here, where the rest of the noise is defined.
# pylint: disable-next=unused-import
from kvlab.pallas_kernels.hash_noise import neg_log as _neg_log, noise_of_hash, uniform_of_hash


def hash_salts(seed: int, layer, head, q_pos, k_pos) -> tuple[jax.Array, jax.Array]:
  """The two uint32 halves of ``gumbel_uniform``'s hash before its finaliser: the query side
  (``q_pos``, ``layer``, ``head``, ``seed``, broadcast together) and the key side (``k_pos``).
  ``uniform_of_hash(row ^ col)`` is ``gumbel_uniform``: a kernel takes one salt per query row
  and one per key slot instead of every coordinate (``pallas_kernels.column_sums``)."""
  u32 = lambda v: jnp.asarray(v).astype(jnp.uint32)
  row = (u32(q_pos) * jnp.uint32(0x9E3779B1)) ^ (u32(layer) * jnp.uint32(0xC2B2AE3D))
  row = row ^ (u32(head) * jnp.uint32(0x27D4EB2F)) ^ jnp.uint32(seed * 0x165667B1 & 0xFFFFFFFF)
  return row, u32(k_pos) * jnp.uint32(0x85EBCA77)


def gumbel_uniform(seed: int, layer, head, q_pos, k_pos) -> jax.Array:
  """Uniform float32 in ``[2^-24, 1 - 2^-24]`` (never 0 or 1) from a hash of the integer
  coordinates (broadcast together): the same coordinates always give the same value (23 bits)."""
  row, col = hash_salts(seed, layer, head, q_pos, k_pos)
  return uniform_of_hash(row ^ col)


def _neg_log_uniform(seed: int, layer, head, q_pos, k_pos) -> jax.Array:
  """``-log u`` of ``gumbel_uniform`` (``_neg_log``)."""
  return _neg_log(gumbel_uniform(seed, layer, head, q_pos, k_pos))


def query_head_ids(kv_heads: int, group: int) -> jax.Array:
  """``[K, G]`` int32: the query head ``k * G + g`` of each (kv head, group member), the ``head``
  coordinate of the noise."""
  return jnp.arange(kv_heads)[:, None] * group + jnp.arange(group)[None, :]


def gumbel_noise(seed: int, layer, head, q_pos, k_pos) -> jax.Array:
  """Standard Gumbel noise ``G = -log(-log u)`` of ``gumbel_uniform``'s ``u``. float32, finite
  (within about [-2.8, 17.4])."""
  return -jnp.log(_neg_log_uniform(seed, layer, head, q_pos, k_pos))


def gumbel_weight(seed: int, layer, head, q_pos, k_pos) -> jax.Array:
  """``exp(G) = 1 / (-log u)`` for the same ``u`` as ``gumbel_noise``: at tau = 1,
  ``exp(s + G - m) = exp(s - m) * exp(G)``, so the attention's own ``exp(s - m)`` times this
  weight gives Keyformer's terms with one log instead of two logs and an exp. At most
  about 3.4e7, so the product cannot overflow float32."""
  return 1.0 / _neg_log_uniform(seed, layer, head, q_pos, k_pos)
