"""ThinK (Xu et al. 2025, METHODS.md §4.3): query-driven pruning of key channels per head.

Per (layer, row, kv head), channel c scores ``mean(q_obs[:, c]**2) * mean(k[:, c]**2)`` over the
observation-window queries and the cached keys; the ``floor(pruning * H)`` lowest channels are
dropped from every key but the newest ``recent`` (stored compactly with the kept channel
indices, ``lib.lowrank.channels``). Values are untouched.

Choices:
* GQA: a kv head's query statistic is the mean over its group's query heads and the window
  (the reference runs on repeated kv heads; with GQA a channel of a kv head serves the group).
* composes after eviction (``snapkv+think``: the paper's main setting); it takes the cache's
  stored-part slot, so it does not also compose with a quantizer here.
* decoded tokens keep all channels (the reference also leaves them until the next compression).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib.cache import KVCache, round_capacity
from kvlab.lib.lowrank.channels import ChannelStore
from kvlab.lib.methods.base import check_at_least, check_types, warn
from kvlab.lib.methods.window import last_queries, window_queries
from kvlab.lib.quant.store import check_plain, first_slots, split_window
from kvlab.lib.sharding import to_host


@dataclasses.dataclass(frozen=True)
class ThinK:
  """``pruning`` fraction of key channels dropped (0.4 in the paper), ``window`` observation
  queries, ``recent`` newest tokens kept whole."""

  pruning: float = 0.4
  window: int = 32
  recent: int = 32
  name = "think"
  quantizes = True  # keeps every token (changes its representation): composes last

  def __post_init__(self):
    check_types(self)
    if not 0.0 <= self.pruning < 1.0:
      raise ValueError(f"think: pruning is the fraction of key channels dropped, in [0, 1), got "
                       f"{self.pruning}: e.g. --method=snapkv+think:pruning=0.4")
    check_at_least(self, "window", 1, "observation queries")
    check_at_least(self, "recent", 0, "newest tokens kept whole")

  @property
  def observe(self):
    return last_queries(self.window)

  def apply(self, cache: KVCache, observations=None, *, extra: int = 0,
            block: int = 512) -> KVCache:
    """Prunes the key channels of all but each head's newest ``recent`` tokens; ``extra`` free
    full-precision slots. Returns the cache with a ``ChannelStore``."""
    del block
    check_plain(self.name, cache)
    if observations is None:
      raise ValueError("think scores channels with the observation-window queries: prefill with "
                       "observe=method.observe and pass the observations")
    kept = cache.head_dim - int(np.floor(self.pruning * cache.head_dim))
    lengths = to_host(cache.lengths)
    n_q = np.maximum(lengths - self.recent, 0)
    if int(n_q.max()) == 0:
      warn(f"think: the prompt ({int(lengths.max())} tokens) is within the newest {self.recent} "
           f"kept whole: no key channel is pruned: lower recent (--method=snapkv+think:recent="
           f"{int(lengths.max()) // 4}) or compress longer prompts")
    q_cap = max(-(-int(n_q.max()) // 64) * 64, 64)
    res_cap = round_capacity(int((lengths - n_q).max()) + extra)
    return _prune(self, cache, observations, jnp.asarray(n_q, jnp.int32), kept, q_cap, res_cap)


@functools.partial(jax.jit, static_argnames=("method", "kept", "q_cap", "res_cap"))
def _prune(method: ThinK, cache: KVCache, obs, n_q, kept: int, q_cap: int,
           res_cap: int) -> KVCache:
  q, qpos = window_queries(obs, method.window)  # [L, B, W, N, H], [L, B, W]
  l, b, w, n, h = q.shape
  k = cache.kv_heads
  ok = (qpos >= 0)[..., None, None, None]
  q2 = jnp.where(ok, jnp.square(q.astype(jnp.float32)).reshape(l, b, w, k, n // k, h), 0.0)
  q_score = q2.sum((2, 4)) / jnp.maximum(ok.sum((2, 4)) * (n // k), 1)  # [L, B, K, H]
  valid = (jnp.arange(cache.capacity) < cache.lengths[..., None])[..., None]
  k2 = jnp.where(valid, jnp.square(cache.keys.astype(jnp.float32)), 0.0).sum(3)
  k_score = k2 / jnp.maximum(cache.lengths[..., None], 1)
  _, ch = jax.lax.top_k(q_score * k_score, kept)
  ch = jnp.sort(ch, axis=-1)  # [L, B, K, C]
  take = lambda x: first_slots(x, q_cap)
  keys = jnp.take_along_axis(take(cache.keys), ch[:, :, :, None, :], axis=-1)
  pos = take(cache.positions)
  pos = jnp.where(jnp.arange(q_cap) < n_q[..., None], pos, -1)
  store = ChannelStore(keys=keys, channels=ch.astype(jnp.uint8), values=take(cache.values),
                       positions=pos, lengths=n_q)
  return split_window(cache, n_q, res_cap, store)
