"""Prefill-time eviction scorers: StreamingLLM, Knorm, SnapKV, TOVA.

Each is a frozen dataclass (a static ``jit`` argument) whose ``scores`` rank cache slots; the
shared ``lib.methods.base.compress`` keeps the top ``budget`` per head. Keys are post-RoPE and
keep their original positions, so no re-rotation is needed after eviction.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvlab.lib.cache import KVCache
from kvlab.lib.methods.accumulated import column_sums
from kvlab.lib.methods.base import (Method, check_at_least, check_choice, evict_one, forced,
                              reduce_group, sinks_note, smallest_budget)
from kvlab.lib.methods.window import (avg_pool, in_window, last_queries, max_pool, window_attention,
                                window_queries, window_query_mask)


POOLING = ("avg", "max")


@dataclasses.dataclass(frozen=True)
class StreamingLLM(Method):
  """Attention sinks + recent window (Xiao et al. 2024): keep the first ``sinks`` tokens and
  the most recent ones up to the budget. Choice: keys stay post-RoPE at their original
  positions (no in-cache re-indexing); the paper's position shift matters only for streams
  past the trained context, which the foundation's context check already forbids."""

  sinks: int = 4
  name = "streaming_llm"

  def __post_init__(self):
    super().__post_init__()
    check_at_least(self, "sinks", 0, "first tokens always kept")

  def budget_notes(self, lengths, kept):
    return sinks_note(self, lengths, kept, "of the recent ones")

  def scores(self, cache: KVCache, obs=None):
    pos = cache.positions.astype(jnp.float32)
    return jnp.where(cache.positions < self.sinks, jnp.inf, pos)


@dataclasses.dataclass(frozen=True)
class Knorm(Method):
  """Keep the keys with the smallest L2 norm (Devoto et al. 2024, kvpress ``KnormPress``)."""

  name = "knorm"

  def scores(self, cache: KVCache, obs=None):
    return -jnp.linalg.norm(cache.keys.astype(jnp.float32), axis=-1)


@dataclasses.dataclass(frozen=True)
class SnapKV(Method):
  """SnapKV (Li et al. 2024): the last ``window`` prompt queries vote with their attention
  (summed over the window), pooled over neighbouring tokens; the window itself is always kept.

  Choices (METHODS.md §2.3): window 32, kernel 5, average pooling (the authors' defaults);
  GQA: scores reduced over each query group with ``gqa`` ('mean' default, or 'max') so the
  cache is never expanded to query heads. Where a head's budget is not larger than the window
  (short prompts, small ratios; the reference code refuses them), the head runs with a window
  of half its budget (``window.effective_window``), so tokens are still chosen by the vote and
  the prompt's first tokens (attention sinks) can be kept; ``compress`` warns.
  """

  window: int = 32
  kernel: int = 5
  pooling: str = "avg"
  gqa: str = "mean"
  name = "snapkv"
  scores_take_kept = True

  def __post_init__(self):
    super().__post_init__()
    check_at_least(self, "window", 1, "observation queries")
    check_at_least(self, "kernel", 1, "pooling width")
    check_choice(self, "pooling", POOLING, "how votes are pooled over neighbours")
    if self.pooling == "avg" and self.kernel % 2 == 0:
      raise ValueError(f"{self.name}: kernel must be odd with pooling=avg (the average is "
                       f"centred on each token), got {self.kernel}: e.g. "
                       f"--method={self.name}:kernel={self.kernel + 1}")

  @property
  def observe(self):
    return last_queries(self.window)

  def budget_notes(self, lengths, kept):
    b, n = smallest_budget(lengths, kept)
    if self.window < b or b >= n:
      return []
    w = max(b // 2, 1)  # window.effective_window of this budget
    short = " (the prompt is not longer than the window)" if n <= self.window else ""
    return [f"{self.name}: the observation window ({self.window} tokens) is not smaller than "
            f"the budget ({b} of a {n}-token prompt){short}: it would keep only the newest "
            f"tokens and evict the first ones (attention sinks), so it runs with a window of "
            f"{w}, as --method={self.name}:window={w} would: set the window below the budget "
            f"yourself, or raise the ratio"]

  def scores(self, cache: KVCache, obs, kept=None):
    """``kept [L, B, K]`` (budgets; None: the whole window) sets each head's window
    (``effective_window``): its queries vote and its tokens are kept."""
    q, qpos = window_queries(obs, self.window)
    a = window_attention(cache, q, qpos)  # [L, B, K, G, W, S]
    if kept is not None:
      a = a * window_query_mask(qpos, self.window, kept)[:, :, :, None, :, None]
    vote = a.sum(-2)  # [L, B, K, G, S]: summed over the window queries
    vote = reduce_group(vote, self.gqa, 3)  # [L, B, K, S]
    win = in_window(cache, qpos, self.window, kept)
    # Pool the pre-window columns only (METHODS.md §2.3 pools A[..., :n-w]): the window's
    # own columns are zero padding here, not neighbours of the last pre-window tokens.
    vote = jnp.where(win, 0.0, vote)
    pool = avg_pool if self.pooling == "avg" else max_pool
    s = pool(vote, self.kernel)
    return jnp.where(win, forced(cache.positions), s)


@dataclasses.dataclass(frozen=True)
class TOVA(Method):
  """TOVA (Oren et al. 2024) at the end of prefill: keep the tokens the last prompt query
  attends to most, averaged over all query heads of the layer (one token set per layer).
  ``gqa`` reduces a kv head's query group in ``head_scores`` (AdaKV's per-head variant) only."""

  gqa: str = "mean"
  name = "tova"

  @property
  def observe(self):
    return last_queries(1)

  def scores(self, cache: KVCache, obs):
    q, qpos = window_queries(obs, 1)
    a = window_attention(cache, q, qpos)  # [L, B, K, G, 1, S]
    s = a.mean(axis=(2, 3, 4))  # [L, B, S]: mean over every query head
    return jnp.broadcast_to(s[:, :, None, :], cache.positions.shape)

  def head_scores(self, cache: KVCache, obs):
    """``[L, B, K, S]``: the last query's attention reduced over each kv head's query group
    only (``gqa``): the per-head variant AdaKV compares across heads (``adakv:scorer=tova``);
    TOVA's own ``scores`` average over every head of the layer."""
    q, qpos = window_queries(obs, 1)
    return reduce_group(window_attention(cache, q, qpos)[..., 0, :], self.gqa, 3)

  @property
  def decode_observe(self):
    return column_sums()

  def update(self, cache: KVCache, obs):
    """Decode time (TOVA's fixed-size cache): once full, drop the slot the current query
    attends to least, averaged over the layer's heads; the newest token is never dropped
    (as kvpress does)."""
    s = jnp.broadcast_to(obs.mean(2, keepdims=True), obs.shape)  # [L, B, K, S]
    newest = cache.positions == (cache.next_position - 1)[None, :, None, None]
    return evict_one(cache, jnp.where(newest, jnp.inf, s), cache.lengths >= cache.capacity)
