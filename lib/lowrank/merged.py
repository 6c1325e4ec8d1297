"""The cross-layer merged part of a KV cache (MiniCache layout), carried in ``KVCache.quant``.

Letters: L layers, B batch, K kv heads, Q stored tokens, H head dim, U unmerged layers, P merged
layer pairs (``U + 2 P = L``; the pairs are layers ``first + 2p, first + 2p + 1``), R retained
tokens per (pair, row, head). A merged layer's index among the merged layers is
``m = layer - first`` (pair ``m // 2``).

* unmerged layers as they were: ``keys, values [U, B, K, Q, H]`` (post-RoPE keys), the layers
  before ``first`` then those after the last pair;
* per pair, keys and values separately (``k_*`` shown; ``v_*`` the same):
  ``k_dir [P, B, K, Q, H]`` the shared unit direction of each token (SLERP of the two layers'),
  ``k_norm [2P, B, K, Q]`` each layer's norm of each token (directions and norms in the
  cache's dtype),
  ``k_kept [2P, B, K, R, H]`` the original vectors of the R retained tokens, and
  ``k_index [P, B, K, R]`` int32 their slots (an index list: R int32 per pair, row and head is
  cheaper than a per-slot map of Q small ints for R well below Q);
* ``positions [L, B, K, Q]`` (-1 empty; identical across layers and heads: a pair is merged token
  by token, so both layers must hold the same tokens), ``lengths [L, B, K]``.

``read`` rebuilds a merged layer's block as ``dir * norm`` and writes the retained originals
over their slots. Post-RoPE keys are merged directly: at one position both layers' keys carry
the same rotation, so the angle between them (and the SLERP) does not depend on it. Nothing is
appended later (decoded tokens stay in the full-precision window), so the store has no
``insert``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class MergedStore:
  """MiniCache's merged layer pairs and unmerged layers (see the module docstring)."""

  keys: jax.Array
  values: jax.Array
  k_dir: jax.Array
  k_norm: jax.Array
  k_kept: jax.Array
  k_index: jax.Array
  v_dir: jax.Array
  v_norm: jax.Array
  v_kept: jax.Array
  v_index: jax.Array
  positions: jax.Array
  lengths: jax.Array
  first: int = struct.field(pytree_node=False, default=0)  # first merged layer
  group: int = struct.field(pytree_node=False, default=8)  # block granularity (trimmed rounds)
  residual: int = struct.field(pytree_node=False, default=0)

  @property
  def capacity(self) -> int:
    return self.positions.shape[3]

  @property
  def pairs(self) -> int:
    return self.k_dir.shape[0]

  def read(self, layer, start, size: int):
    """``(keys (post-RoPE), values [B, K, size, H] float32, positions [B, K, size])`` of slots
    ``[start, start + size)`` of ``layer`` (traced; merged or not)."""
    sl = lambda x, i: jax.lax.dynamic_slice_in_dim(
        jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False), start, size, axis=2)
    pos = sl(self.positions, layer)
    n_merged = 2 * self.pairs
    m = layer - self.first  # index among the merged layers
    if n_merged == 0:
      return (sl(self.keys, layer).astype(jnp.float32), sl(self.values, layer).astype(jnp.float32),
              pos)
    mi = jnp.clip(m, 0, n_merged - 1)

    def merged():
      return (self._merged(self.k_dir, self.k_norm, self.k_kept, self.k_index, mi, start, size),
              self._merged(self.v_dir, self.v_norm, self.v_kept, self.v_index, mi, start, size))

    if self.keys.shape[0] == 0:  # every layer is merged
      return (*merged(), pos)
    ui = jnp.clip(jnp.where(m < 0, layer, layer - n_merged), 0, self.keys.shape[0] - 1)

    def unmerged():
      return sl(self.keys, ui).astype(jnp.float32), sl(self.values, ui).astype(jnp.float32)

    # one branch runs (a select would rebuild the merged block for every layer as well)
    keys, values = jax.lax.cond((m >= 0) & (m < n_merged), merged, unmerged)
    return keys, values, pos

  def _merged(self, direction, norm, kept, index, mi, start, size: int):
    """Block ``[B, K, size, H]`` of merged layer ``mi``: ``dir * norm``, retained slots exact."""
    sl = lambda x, i: jax.lax.dynamic_slice_in_dim(
        jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False), start, size, axis=2)
    x = sl(direction, mi // 2).astype(jnp.float32) * sl(norm, mi).astype(jnp.float32)[..., None]
    if kept.shape[3] == 0:
      return x
    orig = jax.lax.dynamic_index_in_dim(kept, mi, 0, keepdims=False)  # [B, K, R, H]
    rel = jax.lax.dynamic_index_in_dim(index, mi // 2, 0, keepdims=False) - start  # [B, K, R]
    rel = jnp.where((rel >= 0) & (rel < size), rel, size)  # outside the block: dropped
    put = lambda xb, r, o: xb.at[r].set(o.astype(jnp.float32), mode="drop")
    return jax.vmap(jax.vmap(put))(x, rel, orig)

  def trimmed(self) -> "MergedStore":
    """No free slots (rounded to ``group``): what is kept, for reporting bytes."""
    g = self.group
    n = max(-(-int(jnp.max(self.lengths)) // g) * g, g)
    cut = lambda x: x[:, :, :, :n]
    return self.replace(keys=cut(self.keys), values=cut(self.values), k_dir=cut(self.k_dir),
                        k_norm=cut(self.k_norm), v_dir=cut(self.v_dir), v_norm=cut(self.v_norm),
                        positions=cut(self.positions))

  def grown(self, slots: int) -> "MergedStore":
    """Unchanged: nothing is ever added to a merged store (decoded tokens stay in the window)."""
    del slots
    return self


def slerp_merge(x1: jax.Array, x2: jax.Array, t: float):
  """Merges two layers' vectors ``x1, x2 [..., H]`` token by token.

  Returns ``(direction [..., H], norm1, norm2, angle [...])`` (float32): the SLERP at ``t`` of
  the two unit vectors (``t = 0`` gives ``x1``'s direction, 1 ``x2``'s; linear interpolation
  when the angle is ~0), renormalised to unit length; the norms; the angle between them.
  """
  x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
  n1, n2 = jnp.linalg.norm(x1, axis=-1), jnp.linalg.norm(x2, axis=-1)
  unit = lambda x, n: x / jnp.maximum(n, 1e-30)[..., None]
  u1, u2 = unit(x1, n1), unit(x2, n2)
  angle = jnp.arccos(jnp.clip(jnp.sum(u1 * u2, -1), -1.0, 1.0))
  sin = jnp.sin(angle)
  small = sin < 1e-6
  safe = jnp.where(small, 1.0, sin)
  w1 = jnp.where(small, 1.0 - t, jnp.sin((1.0 - t) * angle) / safe)[..., None]
  w2 = jnp.where(small, t, jnp.sin(t * angle) / safe)[..., None]
  e = w1 * u1 + w2 * u2
  return unit(e, jnp.linalg.norm(e, axis=-1)), n1, n2, angle
