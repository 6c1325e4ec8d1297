"""Budget allocators: PyramidKV (per layer, on SnapKV scores) and AdaKV (per head, on any
prefill scorer's scores; SnapKV's by default).

Their budgets differ by layer or head, so by default (``layout="paged"``) the compressed cache
stores only what each head keeps: a ``lib.paged.PagedStore`` (pages of ``page`` slots listed
per head) in the cache's stored part, with an empty full-precision window for the tokens appended
later; where whole pages would take more slots than padding every head (short prompts), the
padded layout is kept instead (``lib.methods.base._pages_save``). ``layout="padded"`` keeps the
stacked ``[L, B, K, S, H]`` layout padded to the largest budget (what a following member of a
composition, e.g. ``adakv+kivi``, receives). Bytes are always reported from the leaves.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib.cache import KVCache
from kvlab.lib.methods.accumulated import H2O, Keyformer
from kvlab.lib.methods.base import FORCED_BASE, check_at_least, check_unit, forced, reduce_group
from kvlab.lib.methods.eviction import Knorm, SnapKV, StreamingLLM, TOVA
from kvlab.lib.methods.expected_attention import ExpectedAttention
from kvlab.lib.methods.kvzip import KVzip
from kvlab.lib.methods.window import (avg_pool, in_window, max_pool, window_attention,
                                window_queries, window_query_mask)


@dataclasses.dataclass(frozen=True)
class Ragged:
  """Mixin of the storage options of methods whose budgets differ per layer or head."""

  layout: str = "paged"
  page: int = 16

  def __post_init__(self):
    super().__post_init__()  # the ratio / budget checks of Method (and SnapKV's fields)
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

  def __post_init__(self):
    super().__post_init__()
    check_at_least(self, "beta", 1, "the top layer keeps 1/beta of the lower budget")

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


# Scorers AdaKV can take budgets from, by their registry names: prefill scorers whose scores
# are per (layer, row, head, slot). Ragged ones (pyramidkv, adakv) and quantizers / low-rank
# methods are not scorers. The classes are imported here, not looked up in ``lib.methods``'s
# registry, which imports this module.
_SCORERS = {"snapkv": SnapKV, "tova": TOVA, "h2o": H2O, "keyformer": Keyformer, "knorm": Knorm,
            "expected_attention": ExpectedAttention, "streaming_llm": StreamingLLM,
            "kvzip": KVzip}
ADAKV_SCORERS = tuple(_SCORERS)


@dataclasses.dataclass(frozen=True)
class AdaKV(Ragged, SnapKV):
  """Ada-KV (Feng et al. 2024): heads of a layer compete for the layer's budget (top ``K * b``
  of the concatenated per-head scores), with a safeguard floor ``alpha`` of the uniform budget
  per head. ``scorer`` names the method whose scores are compared (any of ``ADAKV_SCORERS``;
  ``adakv:scorer=tova`` on the command line), as the paper pairs it with several.

  Choices: with ``scorer="snapkv"`` (the default) scores use the window *mean* and max pooling
  (kernel 7), as the authors' code; ``alpha = 0.2`` (KVCache-Factory / kvpress). Slots the
  scorer forces in (SnapKV's window, H2O's recent tokens, StreamingLLM's sinks: scores at or
  above ``FORCED_BASE``) count against their head's budget and are not competed for. TOVA's own
  scores are one set per layer (the mean over every head), which would leave nothing to move
  between heads, so AdaKV takes its per-kv-head variant (``TOVA.head_scores``: the mean over the
  head's query group). ``gqa`` goes to scorers that take it (SnapKV, TOVA, expected
  attention; H2O's and Keyformer's column sums are group means). Budgets follow the formula of
  KVCache-Factory (each head keeps ``alpha * b`` plus ``1 - alpha`` of what it won); kvpress
  instead forces each head's top ``alpha * b`` and then competes for the rest.
  """

  alpha: float = 0.2
  kernel: int = 7
  pooling: str = "max"
  scorer: str = "snapkv"
  name = "adakv"

  def __post_init__(self):
    super().__post_init__()
    if self.scorer not in ADAKV_SCORERS:
      raise ValueError(f"adakv: scorer must be one of {', '.join(ADAKV_SCORERS)} (a prefill "
                       f"scorer with per-head scores), got {self.scorer!r}: e.g. "
                       "--method=adakv:scorer=tova")
    check_unit(self, "alpha", "the fraction of the uniform budget every head keeps")

  def budget_notes(self, lengths, kept):
    inner = self.inner
    return SnapKV.budget_notes(self, lengths, kept) if inner is None else (
        inner.budget_notes(lengths, kept))

  @property
  def inner(self):
    """The scoring method (with this budget), or None for the built-in SnapKV scores."""
    if self.scorer == "snapkv":
      return None
    cls = _SCORERS[self.scorer]
    own = {"gqa": self.gqa} if "gqa" in {f.name for f in dataclasses.fields(cls)} else {}
    return cls(ratio=self.ratio, budget=self.budget, **own)

  @property
  def observe(self):
    inner = self.inner
    return SnapKV.observe.fget(self) if inner is None else inner.observe

  # Online (compress-during-prefill) hooks of the scorer, where it has them: a property that
  # raises AttributeError reads as absent to ``hasattr``, as the callers test.
  @property
  def carried_scores(self):
    return getattr(self.inner, "carried_scores")  # H2O: column sums carried per slot

  @property
  def accumulate(self):
    return getattr(self.inner, "accumulate")  # expected attention: query moments

  def head_scores(self, cache: KVCache, obs, kept=None):
    """``(free [L, B, K, S], forced [L, B, K, S] bool, scores [L, B, K, S])``: the per-head
    scores competed for (-inf where forced or invalid), the slots forced in, and the scores
    ``select`` ranks each head's slots by. ``kept [L, B, K]`` (uniform budgets) sets each
    head's window where it is not smaller than the budget (``window.effective_window``)."""
    valid = jnp.arange(cache.capacity) < cache.lengths[..., None]
    inner = self.inner
    if inner is not None:
      s = (inner.head_scores if hasattr(inner, "head_scores") else inner.scores)(cache, obs)
      s = s.astype(jnp.float32)
      win = s >= FORCED_BASE
      return jnp.where(valid & ~win, s, -jnp.inf), win, s
    q, qpos = window_queries(obs, self.window)
    a = window_attention(cache, q, qpos)  # [L, B, K, G, W, S]
    if kept is None:
      n_q = jnp.maximum((qpos >= 0).sum(-1), 1)[:, :, None, None, None]
    else:
      voters = window_query_mask(qpos, self.window, kept)  # [L, B, K, W]
      a = a * voters[:, :, :, None, :, None]
      n_q = jnp.maximum(voters.sum(-1), 1)[..., None, None]
    vote = a.sum(-2) / n_q  # mean over window queries
    vote = reduce_group(vote, self.gqa, 3)
    win = in_window(cache, qpos, self.window, kept)
    vote = jnp.where(win, 0.0, vote)  # pool the pre-window columns only (METHODS.md §2.5)
    s = (max_pool if self.pooling == "max" else avg_pool)(vote, self.kernel)
    return jnp.where(valid & ~win, s, -jnp.inf), win, jnp.where(win, forced(cache.positions), s)

  def scores(self, cache: KVCache, obs, kept=None):
    return self.head_scores(cache, obs, kept)[2]

  def budgets(self, cache: KVCache, obs, kept: jax.Array) -> jax.Array:
    """``[L, B, K]`` per-head budgets (forced slots included) summing to the layer's total."""
    return self.scores_and_budgets(cache, obs, kept)[1]

  def scores_and_budgets(self, cache: KVCache, obs, kept: jax.Array | None):
    """``scores`` and, for ``kept [L, B, K]`` (the uniform budgets; None: skipped),
    ``budgets``, from one ``head_scores`` pass (the window attention): ``compress`` takes both
    together."""
    s, win, scores = self.head_scores(cache, obs, kept)
    if kept is None:
      return scores, None
    n_win = jnp.minimum(win.sum(-1), kept)  # [L, B, K]
    b = jnp.maximum(kept - n_win, 0)  # uniform non-forced budget per head
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
