"""Key channels pruned per head (ThinK layout), carried in ``KVCache.quant``.

Letters: L layers, B batch, K kv heads, Q stored tokens, H head dim, C kept key channels.

* ``keys [L, B, K, Q, C]`` the kept channels of the older tokens' (post-RoPE) keys,
  ``channels [L, B, K, C]`` uint8 which channels (ascending);
* ``values [L, B, K, Q, H]`` untouched;
* ``positions [L, B, K, Q]`` (-1 empty), ``lengths [L, B, K]``.

``read`` puts the kept channels back in place with zeros elsewhere, so ``q . k`` sums over the
kept channels only (the same as masking the query's pruned channels). Nothing is appended later
(the newest tokens and decoded ones stay in the full-precision window), so no ``insert``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class ChannelStore:
  """Pruned-key-channel part of a cache (see the module docstring)."""

  keys: jax.Array
  channels: jax.Array
  values: jax.Array
  positions: jax.Array
  lengths: jax.Array
  group: int = struct.field(pytree_node=False, default=8)  # block granularity (trimmed rounds to it)
  residual: int = struct.field(pytree_node=False, default=0)

  @property
  def capacity(self) -> int:
    return self.keys.shape[3]

  def read(self, layer, start, size: int):
    """``(keys, values [B, K, size, H] float32, positions [B, K, size])`` of slots
    ``[start, start + size)``; pruned key channels read as 0."""
    sl = lambda x: jax.lax.dynamic_slice_in_dim(
        jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False), start, size, axis=2)
    ch = jax.lax.dynamic_index_in_dim(self.channels, layer, 0, keepdims=False)  # [B, K, C]
    kept = sl(self.keys).astype(jnp.float32)  # [B, K, size, C]
    h = self.values.shape[-1]
    onehot = (ch[..., None].astype(jnp.int32) == jnp.arange(h)).astype(jnp.float32)  # [B,K,C,H]
    keys = jnp.einsum("BKSC,BKCH->BKSH", kept, onehot)
    return keys, sl(self.values).astype(jnp.float32), sl(self.positions)

  def trimmed(self) -> "ChannelStore":
    """No free slots (rounded to ``group``): what is kept, for reporting bytes."""
    g = self.group
    n = max(-(-int(jnp.max(self.lengths)) // g) * g, g)
    cut = lambda x: x[:, :, :, :n]
    return self.replace(keys=cut(self.keys), values=cut(self.values),
                        positions=cut(self.positions))

  def grown(self, slots: int) -> "ChannelStore":
    """Unchanged: nothing is added to the pruned part (decoded tokens stay in the window)."""
    del slots
    return self
