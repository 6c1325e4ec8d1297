"""Budget allocators: PyramidKV (per layer) and AdaKV (per head), both on SnapKV scores.

Their budgets differ by layer or head, so by default (``layout="paged"``) the compressed cache
stores only what each head keeps: a ``lib.paged.PagedStore`` (pages of ``page`` slots listed
per head) in the cache's stored part, with an empty full-precision window for the tokens appended
later. ``layout="padded"`` keeps the stacked ``[L, B, K, S, H]`` layout padded to the largest
budget (what a following member of a composition, e.g. ``adakv+kivi``, receives). Bytes are
always reported from the leaves.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lib.cache import KVCache
from lib.methods.base import forced
from lib.methods.eviction import SnapKV
from lib.methods.window import (avg_pool, in_window, max_pool, window_attention,
                                window_queries)


@dataclasses.dataclass(frozen=True)
class Ragged:
  """Mixin of the storage options of methods whose budgets differ per layer or head."""

  layout: str = "paged"
  page: int = 16

  def __post_init__(self):
    super().__post_init__()  # the ratio / budget checks of Method
    if self.layout not in ("paged", "padded"):
      raise ValueError(f"{self.name}: layout must be 'paged' (only what each head keeps) or "
                       f"'padded' (every head at the largest budget), got {self.layout!r}")
    if self.page < 1:
      raise ValueError(f"{self.name}: page must be >= 1 slot, got {self.page}")


@dataclasses.dataclass(frozen=True)
class PyramidKV(Ragged, SnapKV):
  """PyramidKV (Cai et al. 2024): SnapKV scores, arithmetic layer budgets (lower layers keep
  more; mean unchanged), ``beta=20``. Like the reference code, prompts shorter than twice the
  non-window budget fall back to SnapKV's uniform budget (METHODS.md §2.4 quirk)."""

  beta: int = 20
  name = "pyramidkv"

  def kept(self, lengths: np.ndarray) -> np.ndarray:
    uniform = super().kept(lengths)  # [L, B, K]
    n_layers = lengths.shape[0]
    out = uniform.copy()
    for b in range(lengths.shape[1]):
      n = int(lengths[0, b, 0])
      total = int(uniform[0, b, 0])
      w = min(self.window, total)
      bb = total - w
      if n_layers < 2 or bb <= 0 or n < 2 * bb:
        continue
      min_num = bb // self.beta
      max_num = 2 * bb - min_num
      if max_num >= n - w:
        max_num = n - w
        min_num = 2 * bb - max_num
      step = (max_num - min_num) // (n_layers - 1)
      per_layer = np.array([max_num - l * step for l in range(n_layers)]) + w
      out[:, b, :] = np.minimum(per_layer[:, None], lengths[:, b, :])
    return out


@dataclasses.dataclass(frozen=True)
class AdaKV(Ragged, SnapKV):
  """Ada-KV (Feng et al. 2024) on SnapKV scores: heads of a layer compete for the layer's
  budget (top ``K * b`` of the concatenated per-head scores), with a safeguard floor
  ``alpha`` of the uniform budget per head. Choices: scores use the window *mean* and max
  pooling (kernel 7), as the authors' code; ``alpha = 0.2`` (KVCache-Factory / kvpress)."""

  alpha: float = 0.2
  kernel: int = 7
  pooling: str = "max"
  name = "adakv"

  def head_scores(self, cache: KVCache, obs):
    q, qpos = window_queries(obs, self.window)
    a = window_attention(cache, q, qpos)  # [L, B, K, G, W, S]
    n_q = jnp.maximum((qpos >= 0).sum(-1), 1)[:, :, None, None, None]
    vote = a.sum(-2) / n_q  # mean over window queries
    vote = vote.mean(3) if self.gqa == "mean" else vote.max(3)
    win = in_window(cache, qpos, self.window)
    vote = jnp.where(win, 0.0, vote)  # pool the pre-window columns only (METHODS.md §2.5)
    s = (max_pool if self.pooling == "max" else avg_pool)(vote, self.kernel)
    valid = jnp.arange(cache.capacity) < cache.lengths[..., None]
    s = jnp.where(valid & ~win, s, -jnp.inf)
    return s, win

  def scores(self, cache: KVCache, obs):
    return self.scores_and_budgets(cache, obs, None)[0]

  def budgets(self, cache: KVCache, obs, kept: jax.Array) -> jax.Array:
    """``[L, B, K]`` per-head budgets (window included) summing to the layer's total."""
    return self.scores_and_budgets(cache, obs, kept)[1]

  def scores_and_budgets(self, cache: KVCache, obs, kept: jax.Array | None):
    """``scores`` and, for ``kept [L, B, K]`` (the uniform budgets; None: skipped),
    ``budgets``, from one ``head_scores`` pass (the window attention): ``compress`` takes both
    together."""
    s, win = self.head_scores(cache, obs)
    scores = jnp.where(win, forced(cache.positions), s)
    if kept is None:
      return scores, None
    n_win = win.sum(-1)  # [L, B, K]
    b = jnp.maximum(kept - n_win, 0)  # uniform non-window budget per head
    l_, bt, k, s_cap = s.shape
    winners = top_total(s.reshape(l_, bt, k * s_cap), b.sum(-1)).reshape(s.shape)
    cnt = (winners & jnp.isfinite(s)).sum(-1)
    alloc = jnp.round(cnt * (1 - self.alpha) + self.alpha * b).astype(jnp.int32)
    return scores, jnp.minimum(alloc + n_win, cache.lengths)


def top_total(flat: jax.Array, total: jax.Array) -> jax.Array:
  """``flat [..., N]``, ``total [...]`` -> bool ``[..., N]``: the ``total`` largest entries of
  each row, ties going to the lower index (the first ``total`` of a stable descending argsort),
  from one sort of the values instead of ranking by two argsorts."""
  desc = -jnp.sort(-flat, axis=-1)
  t = jnp.clip(total, 0, flat.shape[-1])[..., None]
  thr = jnp.take_along_axis(desc, jnp.maximum(t - 1, 0), axis=-1)  # the total-th largest
  above = flat > thr
  tied = flat == thr
  room = t - above.sum(-1, keepdims=True)  # how many of the tied entries still fit
  return (above | (tied & (jnp.cumsum(tied, axis=-1) <= room))) & (t > 0)
