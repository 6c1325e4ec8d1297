"""Per-head projected keys and values (MatryoshkaKV layout), carried in ``KVCache.quant``.

Letters: L layers, B batch, K kv heads, Q stored tokens, H head dim, R_l the width of layer l
(the largest rank of its heads), R the largest width, W = the flat coefficient width.

* ``k_coef [1, B, K, Q, W]``: every layer's per-token coefficients ``(k - mean) @ U[:, :R_l]``
  of the post-RoPE keys side by side on one flat axis, layer l at columns ``[k_offsets[l],
  k_offsets[l] + R_l)``, so a layer stores only its own width (with per-layer or per-head
  ranks the bytes follow the ranks, not the largest one; ``W = max_l(offset_l + R)`` so every
  layer's R-wide read stays inside). The leading axis of 1 keeps the ``[L, B, K, ...]`` leaf
  rule of ``lib.sharding`` (rows on ``data``, heads on ``model``);
* ``k_basis [L, K, H, R]`` the orthonormal columns ``U[:, :r]`` (zero past each head's rank
  ``r``, so columns read past a layer's width contribute nothing), ``k_mean [L, K, H]``; values
  the same (``v_offsets``);
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
  k_offsets: tuple = struct.field(pytree_node=False, default=())  # per layer, on the flat axis
  v_offsets: tuple = struct.field(pytree_node=False, default=())
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

    def rebuild(coef, offsets, basis, mean):
      b, k, _, _ = coef.shape[1:]
      r = basis.shape[-1]
      off = jnp.asarray(offsets, jnp.int32)[layer]
      c = jax.lax.dynamic_slice(coef[0], (0, 0, start, off), (b, k, size, r))
      x = jnp.einsum("BKSR,KHR->BKSH", c.astype(jnp.float32), at(basis).astype(jnp.float32))
      return x + at(mean).astype(jnp.float32)[None, :, None, :]

    return (rebuild(self.k_coef, self.k_offsets, self.k_basis, self.k_mean),
            rebuild(self.v_coef, self.v_offsets, self.v_basis, self.v_mean), sl(self.positions))

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


def layer_widths(ranks) -> tuple[int, ...]:
  """``ranks [L, K]`` -> each layer's width ``R_l`` (its largest head rank)."""
  return tuple(int(r) for r in ranks.max(axis=1))


def flat_offsets(widths: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
  """Layer offsets on the flat axis and its width ``W`` (every ``max(widths)``-wide read from
  an offset stays inside)."""
  offsets, o = [], 0
  for w in widths:
    offsets.append(o)
    o += w
  r = max(widths)
  return tuple(offsets), max(off + r for off in offsets)


def flatten(coef: jax.Array, widths: tuple[int, ...]) -> jax.Array:
  """``coef [L, B, K, Q, R]`` -> ``[1, B, K, Q, W]``: layer l's first ``widths[l]`` columns
  side by side (zero-padded to W)."""
  _, total = flat_offsets(widths)
  parts = [coef[l, ..., :w] for l, w in enumerate(widths)]
  flat = jnp.concatenate(parts, axis=-1)
  return jnp.pad(flat, [(0, 0)] * 3 + [(0, total - flat.shape[-1])])[None]
