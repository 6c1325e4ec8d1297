"""The one KV-cache pytree of kvlab.

Axis letters (used in every attention and kernel file):
  L layers, B batch, K kv heads, S cache slots (capacity), T new tokens, H head dim.

Slots ``[0, lengths[l, b, k])`` of a (layer, row, head) hold valid entries; the rest is free
space (or, for a compressed cache, simply absent: a compressed cache is allocated with a
smaller capacity, so its saving shows in ``nbytes``). Every kept slot remembers the original
position of its token, so keys keep their RoPE phase after eviction and attention can apply
position-based masks (sliding windows) to a reordered cache.

Hybrid models (Gemma 3) mark their sliding-window layers in ``windows`` (static metadata, one
entry per layer): compression keeps a local layer's window and compresses the global layers
(``lib.methods.base.compress``), and ``nbytes_by_kind`` reports bytes per layer kind. The local
layers still use the plain slot layout (no ring buffer yet), so before compression they hold the
whole prompt like global layers do.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class KVCache:
  """Stacked per-layer KV cache.

  Attributes:
    keys: ``[L, B, K, S, H]`` post-RoPE keys.
    values: ``[L, B, K, S, H]``.
    positions: ``[L, B, K, S]`` int32 original token position of each slot, -1 if empty.
    lengths: ``[L, B, K]`` int32 number of valid slots (they are packed at the front).
    next_position: ``[B]`` int32 position the next appended token receives (the number of
      tokens the row has seen, compressed or not).
    scores: optional ``[L, B, K, S]`` float32 per-slot statistic carried by decode-time
      methods (H2O's accumulated attention); None otherwise (and then it costs no bytes).
    quant: optional stored part holding the older tokens in a compact form: packed low-bit
      codes (``lib.quant.store.QuantStore`` for KIVI, ``lib.quant.kvquant_store.KVQuantStore``),
      cross-layer SVD factors (``lib.lowrank.store.LowRankStore``, xKV) or pruned key channels
      (``lib.lowrank.channels.ChannelStore``, ThinK). Every store has ``capacity``, ``group``,
      ``lengths``, ``read(layer, start, size)`` (float keys/values of a block, post-RoPE),
      ``trimmed()`` and ``grown(n)``; the streaming ones also ``insert`` (decode-time flush).
      ``keys/values`` then hold the newest tokens in full precision (the window) and attention
      reads both. None for a plain cache.
    windows: static per-layer tuple for hybrid models: a local (sliding-window) layer's window,
      0 for a global layer; None when every layer is alike (the cache then knows no kinds).
  """

  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  lengths: jax.Array
  next_position: jax.Array
  scores: jax.Array | None = None
  quant: Any = None
  windows: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

  @classmethod
  def init(
      cls,
      *,
      num_layers: int,
      batch: int,
      kv_heads: int,
      capacity: int,
      head_dim: int,
      dtype=jnp.float32,
      windows: tuple[int, ...] | None = None,
  ) -> "KVCache":
    """Allocates an empty cache with ``capacity`` slots per (layer, row, head); ``windows``:
    per layer, a local layer's sliding window or 0 (hybrid models: the model config's
    ``layer_windows``)."""
    if capacity <= 0:
      raise ValueError(f"cache capacity must be positive, got {capacity}")
    if windows is not None:
      windows = tuple(int(w) for w in windows)
      if len(windows) != num_layers or min(windows) < 0:
        raise ValueError(f"windows must give one window >= 0 per layer ({num_layers}), got "
                         f"{windows}")
    shape = (num_layers, batch, kv_heads, capacity, head_dim)
    return cls(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        positions=jnp.full(shape[:-1], -1, jnp.int32),
        lengths=jnp.zeros(shape[:3], jnp.int32),
        next_position=jnp.zeros((batch,), jnp.int32),
        windows=windows,
    )

  @classmethod
  def planned_nbytes(cls, **init_kwargs) -> int:
    """Bytes ``init(**init_kwargs)`` would allocate, from its leaves' shapes (nothing is
    allocated): for checking a cache fits before creating it."""
    shapes = jax.eval_shape(lambda: cls.init(**init_kwargs))
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes)))

  # ---- static facts --------------------------------------------------------------------
  @property
  def num_layers(self) -> int:
    return self.keys.shape[0]

  @property
  def batch(self) -> int:
    return self.keys.shape[1]

  @property
  def kv_heads(self) -> int:
    return self.keys.shape[2]

  @property
  def capacity(self) -> int:
    return self.keys.shape[3]

  @property
  def head_dim(self) -> int:
    return self.keys.shape[4]

  @property
  def nbytes(self) -> int:
    """Bytes allocated by the cache, summed over its leaves (never from a formula)."""
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(self)))

  @property
  def local_layers(self) -> np.ndarray:
    """``[L]`` bool: the layers with a sliding window (all False unless ``windows`` is set)."""
    if self.windows is None:
      return np.zeros((self.num_layers,), bool)
    return np.asarray(self.windows) > 0

  def nbytes_by_kind(self) -> dict[str, int]:
    """Bytes allocated per layer kind, from the leaves: ``{"global": .., "local": .., "other":
    ..}``. Per-layer leaves (keys, values, positions, lengths, scores: leading axis L) are split
    by ``local_layers``; per-row ``next_position`` and any stored part (``quant``) count as
    "other". The three sum to ``nbytes``."""
    local = self.local_layers
    out = {"global": 0, "local": 0, "other": 0}
    for x in (self.keys, self.values, self.positions, self.lengths, self.scores):
      if x is None:
        continue
      per_layer = x.nbytes // x.shape[0]
      out["local"] += per_layer * int(local.sum())
      out["global"] += per_layer * int((~local).sum())
    rest = [self.next_position] + jax.tree_util.tree_leaves(self.quant)
    out["other"] = int(sum(x.nbytes for x in rest))
    return out

  def trimmed(self) -> "KVCache":
    """The same contents with no free slots (rounded to 8; a quantized part to its group):
    what a compressed cache keeps, for reporting its bytes. Host-level (reads lengths)."""
    out = self.resize(round_capacity(int(jnp.max(self.lengths))))
    return out if self.quant is None else out.replace(quant=self.quant.trimmed())

  # ---- updates ---------------------------------------------------------------------------
  def resize(self, capacity: int, check: bool = True) -> "KVCache":
    """Same contents with ``capacity`` slots (pads with empty slots or drops unused ones).

    Raises if a valid slot would be dropped (``check=False`` skips that, e.g. inside ``jit``).
    """
    if check and capacity < int(jnp.max(self.lengths)):
      raise ValueError(f"cannot shrink the cache to {capacity} slots: it holds "
                       f"{int(jnp.max(self.lengths))} valid tokens in some head")
    s = self.capacity
    opt = lambda f, x: None if x is None else f(x)
    if capacity <= s:
      cut = lambda x: x[:, :, :, :capacity]
      return self.replace(keys=cut(self.keys), values=cut(self.values),
                          positions=cut(self.positions), scores=opt(cut, self.scores))
    pad = [(0, 0)] * 3 + [(0, capacity - s)]
    return self.replace(
        keys=jnp.pad(self.keys, pad + [(0, 0)]),
        values=jnp.pad(self.values, pad + [(0, 0)]),
        positions=jnp.pad(self.positions, pad, constant_values=-1),
        scores=opt(lambda x: jnp.pad(x, pad), self.scores))

  def free_slots(self) -> int | None:
    """Tokens that can still be appended to every (layer, row, head) before a write would pass
    the capacity (host side; None under ``jit``, where lengths are not concrete).

    Per head: the full-precision part's free slots, plus, for a streaming store (KIVI,
    KVQuant), the whole groups its free slots hold, which decoding fills by flushing the window's
    oldest ``group`` tokens once it holds ``residual + group`` (besides its sinks): only where
    the window's capacity lets it reach that size. The minimum over heads."""
    from kvlab.lib.sharding import to_host  # pylint: disable=g-import-not-at-top
    if isinstance(self.lengths, jax.core.Tracer):
      return None
    free = self.capacity - to_host(self.lengths).astype(np.int64)  # [L, B, K]; multi-host: gathered
    q = self.quant
    if q is not None and hasattr(q, "insert") and not isinstance(q.lengths, jax.core.Tracer):
      g = q.group
      groups = (q.capacity - to_host(q.lengths).astype(np.int64)) // g * g  # [L, B, K]
      sink = getattr(q, "sink", 0)
      skip = 0
      if sink:  # sinks sit at the front of the window (lib.quant.store.flush)
        pos = to_host(self.positions[..., :sink])
        skip = ((pos >= 0) & (pos < sink)).sum(-1)
      flushes = self.capacity >= q.residual + g + skip
      free = free + np.where(flushes, groups, 0)
    return int(free.min())

  def append(self, k_new: jax.Array, v_new: jax.Array, n_new: jax.Array) -> "KVCache":
    """Writes T new tokens per (layer, row, head) after its valid slots.

    Args:
      k_new: ``[L, B, K, T, H]`` keys of the new tokens (post-RoPE).
      v_new: ``[L, B, K, T, H]``.
      n_new: ``[B]`` int32, how many of the T tokens are real for each row (the rest is
        right padding: written but left outside ``lengths``).

    Returns:
      The cache with ``lengths += n_new`` and ``next_position += n_new``. The caller must
      guarantee ``lengths + T <= capacity`` (``lib.generate`` checks it before tracing).
    """
    t = k_new.shape[3]
    offs = jnp.arange(t, dtype=jnp.int32)
    pos_new = jnp.where(offs[None, :] < n_new[:, None],
                        self.next_position[:, None] + offs[None, :], -1)  # [B, T]
    pos_new = jnp.broadcast_to(pos_new[None, :, None, :], k_new.shape[:4])

    def write(buf, new, start):  # buf [S, ...], new [T, ...]
      return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start, axis=0)

    write_lbk = jax.vmap(jax.vmap(jax.vmap(write)))
    scores = self.scores
    if scores is not None:
      scores = write_lbk(scores, jnp.zeros(k_new.shape[:4], scores.dtype), self.lengths)
    return self.replace(
        scores=scores,
        keys=write_lbk(self.keys, k_new, self.lengths),
        values=write_lbk(self.values, v_new, self.lengths),
        positions=write_lbk(self.positions, pos_new, self.lengths),
        lengths=self.lengths + n_new[None, :, None].astype(jnp.int32),
        next_position=self.next_position + n_new.astype(jnp.int32),
    )


def round_capacity(n: int, block: int | None = None) -> int:
  """Capacity for ``n`` tokens: rounded up to a multiple of 8 (attention takes any capacity;
  ``block`` is accepted for call sites that pass the attention block and is not needed)."""
  del block
  n = max(int(n), 1)
  return -(-n // 8) * 8
