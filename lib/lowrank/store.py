"""The low-rank part of a KV cache (xKV layout), carried in ``KVCache.quant``.

Letters: L layers, B batch, K kv heads, H head dim, Q stored tokens, C = L / layers_per_group
layer groups, r the rank (``rk`` keys, ``rv`` values), F = K * H features of one layer.

For every group of ``layers_per_group`` adjacent layers and every batch row, the pre-RoPE keys of
the group's layers, side by side (``[Q, group * F]``), are factored by a truncated SVD into a
shared token factor ``U_r S_r`` and one right factor per layer:

* ``k_coef [C, B, Q, rk]`` (token factors), ``k_basis [L, B, rk, F]`` (per-layer right factors);
  values the same with ``rv``; the reconstruction of layer l is ``coef[l // group] @ basis[l]``;
* ``positions [L, B, K, Q]`` (-1 empty; identical across layers and heads: xKV needs the same
  tokens everywhere), ``lengths [L, B, K]``, ``inv_freq [H/2]`` to rotate keys back.

``read`` reconstructs a block of slots and re-applies RoPE; attention folds it into its online
softmax like any stored part. Nothing is appended later (xKV compresses the prefill; decoded
tokens stay in the full-precision window), so the store has no ``insert``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvlab.lib.rope import rotate


@struct.dataclass
class LowRankStore:
  """Cross-layer SVD factors of the prefill keys and values (see the module docstring)."""

  k_coef: jax.Array
  k_basis: jax.Array
  v_coef: jax.Array
  v_basis: jax.Array
  positions: jax.Array
  lengths: jax.Array
  inv_freq: jax.Array
  layers_per_group: int = struct.field(pytree_node=False, default=4)
  group: int = struct.field(pytree_node=False, default=8)  # block granularity (trimmed rounds to it)
  residual: int = struct.field(pytree_node=False, default=0)

  # ``[C|L, B, ...]`` leaves without a kv-head axis: ``lib.sharding.cache_specs`` puts their
  # rows on the mesh's data axis (each row's factors are its own).
  row_leaves = ("k_coef", "k_basis", "v_coef", "v_basis")

  @property
  def capacity(self) -> int:
    return self.k_coef.shape[2]

  def read(self, layer, start, size: int):
    """Reconstructed ``(keys (post-RoPE), values [B, K, size, H] float32, positions
    [B, K, size])`` of slots ``[start, start + size)`` of ``layer``."""
    c = layer // self.layers_per_group
    pos = jax.lax.dynamic_slice_in_dim(
        jax.lax.dynamic_index_in_dim(self.positions, layer, 0, keepdims=False), start, size, 2)
    b, k = pos.shape[:2]

    def rebuild(coef, basis):
      u = jax.lax.dynamic_slice_in_dim(
          jax.lax.dynamic_index_in_dim(coef, c, 0, keepdims=False), start, size, 1)  # [B, s, r]
      v = jax.lax.dynamic_index_in_dim(basis, layer, 0, keepdims=False)  # [B, r, F]
      x = jnp.einsum("BSR,BRF->BSF", u.astype(jnp.float32), v.astype(jnp.float32))
      return x.reshape(b, size, k, -1).transpose(0, 2, 1, 3)  # [B, K, s, H]

    keys = rotate(rebuild(self.k_coef, self.k_basis), jnp.maximum(pos, 0), self.inv_freq)
    return keys, rebuild(self.v_coef, self.v_basis), pos

  def trimmed(self) -> "LowRankStore":
    """No free slots (rounded to ``group``): what is kept, for reporting bytes."""
    g = self.group
    n = max(-(-int(jnp.max(self.lengths)) // g) * g, g)
    return self.replace(k_coef=self.k_coef[:, :, :n], v_coef=self.v_coef[:, :, :n],
                        positions=self.positions[:, :, :, :n])

  def grown(self, slots: int) -> "LowRankStore":
    """Unchanged: nothing is ever added to a low-rank store (decoded tokens stay in the window)."""
    del slots
    return self


def factor(x: jax.Array, valid: jax.Array, rank: int):
  """Truncated SVD of one group: ``x [B, Q, G, F]`` (G layers' features per token), rows with
  ``valid [B, Q]`` False zeroed. Returns ``(coef [B, Q, rank], basis [G, B, rank, F])`` with
  ``coef @ basis[g] ~= x[:, :, g]`` (exact at full rank)."""
  b, q, g, f = x.shape
  x = jnp.where(valid[..., None, None], x.astype(jnp.float32), 0.0).reshape(b, q, g * f)
  u, s, vt = jnp.linalg.svd(x, full_matrices=False)  # [B, Q, m], [B, m], [B, m, G*F]
  coef = u[..., :rank] * s[:, None, :rank]
  basis = vt[:, :rank].reshape(b, -1, g, f).transpose(2, 0, 1, 3)  # [G, B, r, F]
  if coef.shape[-1] < rank:  # fewer tokens/features than the rank: pad with zero factors
    pad = rank - coef.shape[-1]
    coef = jnp.pad(coef, ((0, 0), (0, 0), (0, pad)))
    basis = jnp.pad(basis, ((0, 0), (0, 0), (0, pad), (0, 0)))
  return coef, basis
