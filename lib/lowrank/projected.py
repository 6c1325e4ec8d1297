"""Per-head projected keys and values (MatryoshkaKV layout), carried in ``KVCache.quant``.

Letters: L layers, B batch, K kv heads, Q stored tokens, H head dim, R stored rank (the largest
rank of any layer and head; a head of lower rank has zero basis columns past its rank).

* ``k_coef [L, B, K, Q, R]`` per-token coefficients ``(k - mean) @ U[:, :R]`` of the post-RoPE
  keys, ``k_basis [L, K, H, R]`` the orthonormal columns ``U[:, :r]`` (zero past each head's
  rank ``r``), ``k_mean [L, K, H]``; values the same;
* ``positions [L, B, K, Q]`` (-1 empty), ``lengths [L, B, K]``.

``read`` rebuilds ``coef @ basis^T + mean`` block by block; attention folds it into its online
softmax like any stored part. (The reference attends in the projected space with the queries
projected the same way; the logits are identical.) Nothing is appended later (decoded tokens
stay in the full-precision window), so the store has no ``insert``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class ProjectedStore:
  """Per-head low-rank projections of keys and values (see the module docstring)."""

  k_coef: jax.Array
  k_basis: jax.Array
  k_mean: jax.Array
  v_coef: jax.Array
  v_basis: jax.Array
  v_mean: jax.Array
  positions: jax.Array
  lengths: jax.Array
  group: int = struct.field(pytree_node=False, default=8)  # block granularity (trimmed rounds to it)
  residual: int = struct.field(pytree_node=False, default=0)

  @property
  def capacity(self) -> int:
    return self.k_coef.shape[3]

  def read(self, layer, start, size: int):
    """Rebuilt ``(keys (post-RoPE), values [B, K, size, H] float32, positions [B, K, size])``
    of slots ``[start, start + size)`` of ``layer``."""
    at = lambda x: jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
    sl = lambda x: jax.lax.dynamic_slice_in_dim(at(x), start, size, axis=2)

    def rebuild(coef, basis, mean):
      x = jnp.einsum("BKSR,KHR->BKSH", sl(coef).astype(jnp.float32),
                     at(basis).astype(jnp.float32))
      return x + at(mean).astype(jnp.float32)[None, :, None, :]

    return (rebuild(self.k_coef, self.k_basis, self.k_mean),
            rebuild(self.v_coef, self.v_basis, self.v_mean), sl(self.positions))

  def trimmed(self) -> "ProjectedStore":
    """No free slots (rounded to ``group``): what is kept, for reporting bytes."""
    g = self.group
    n = max(-(-int(jnp.max(self.lengths)) // g) * g, g)
    cut = lambda x: x[:, :, :, :n]
    return self.replace(k_coef=cut(self.k_coef), v_coef=cut(self.v_coef),
                        positions=cut(self.positions))

  def grown(self, slots: int) -> "ProjectedStore":
    """Unchanged: nothing is added to the projected part (decoded tokens stay in the window)."""
    del slots
    return self
