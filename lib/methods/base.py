"""The method interface: a frozen, hashable dataclass that scores cache slots and keeps the best.

Letters: L layers, B batch, K kv heads, S cache slots, N query heads, H head dim, W window.

A method may define
  * ``observe(layer, x: LayerInputs, cache)`` — runs inside prefill,
    per layer and chunk (see ``lib.attention.ObserveFn``); its outputs arrive stacked
    ``[chunks, L, ...]`` in ``compress``;
  * ``scores(cache, obs) -> [L, B, K, S]`` — higher is kept; ``+inf`` forces a slot in;
  * ``kept(lengths) -> [L, B, K]`` — the budget policy (default: ``ratio`` or ``budget`` of each
    row's length, the same for every layer and head).

``compress(method, cache, obs)`` then gathers the kept slots (sorted by original position) into a
cache whose capacity is the largest budget (+ ``extra`` free slots for the question and answer),
so the saving shows in ``cache.nbytes``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib.sharding import to_host
from kvlab.lib.cache import KVCache, round_capacity

NEG_INF = -jnp.inf
# Score of a slot a method must keep (window, recent, sinks): above any attention-derived
# score, and increasing with position so that, when more slots are forced than the budget
# holds, the most recent win. 2**23 keeps integer positions exact in float32.
FORCED_BASE = float(2 ** 23)


# GQA aggregation: how scores of the query heads sharing a kv head become that head's score.
GQA = ("mean", "max")


def reduce_group(x: jax.Array, gqa: str, axis: int) -> jax.Array:
  """Reduces the query-group axis ``axis`` of per-query-head scores by ``gqa`` ('mean' or
  'max'), so the cache is never expanded to query heads."""
  return x.mean(axis) if gqa == "mean" else x.max(axis)


def forced(positions: jax.Array) -> jax.Array:
  """Keep-score of forced slots: ``2**23 + position``."""
  return FORCED_BASE + positions.astype(jnp.float32)


def smallest_budget(lengths: np.ndarray, kept: np.ndarray) -> tuple[int, int]:
  """``(budget, prompt length)`` of the (layer, row, head) with the smallest budget, for
  warnings (host arrays ``[L, B, K]``)."""
  i = np.unravel_index(int(np.argmin(kept)), kept.shape)
  return int(kept[i]), int(lengths[i])


class MethodWarning(UserWarning):
  """A method ran, but its result is not what its name and ratio suggest (a window or sinks
  that fill the budget, a compressed cache larger than the full one): filter on this class."""


def sinks_note(method, lengths: np.ndarray, kept: np.ndarray, lost: str) -> list[str]:
  """``[note]`` when ``method.sinks`` fill the smallest budget of ``kept`` (of ``lengths``)
  so that nothing ``lost`` (e.g. "by score") is kept; ``[]`` otherwise."""
  b, n = smallest_budget(lengths, kept)
  if method.sinks < b or b >= n:
    return []
  return [f"{method.name}: the sinks ({method.sinks} tokens) fill the budget ({b} of a "
          f"{n}-token prompt): only the first {b} tokens are kept, none {lost}: lower the "
          f"sinks (--method={method.name}:sinks={max(b // 8, 0)}) or raise the ratio"]


def warn(message: str) -> None:
  """Issues ``message`` as a ``MethodWarning`` (printed once per distinct message)."""
  warnings.warn(message, MethodWarning, stacklevel=3)


def field_types(cls) -> dict[str, set[str]]:
  """``{field: {"int", "None", ...}}`` from the dataclass annotations (strings or types)."""
  out = {}
  for f in dataclasses.fields(cls):
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    out[f.name] = {p.strip() for p in str(t).replace("Optional[", "").rstrip("]").split("|")}
  return out


def example(method, key: str) -> str:
  """A value of option ``key`` for an error's example: the field's default, else a typical one."""
  f = {f.name: f for f in dataclasses.fields(method)}[key]
  v = f.default if f.default is not dataclasses.MISSING else None
  if v is None:
    return {"ratio": "0.5", "budget": "64"}.get(key, "1")
  return str(v).lower() if isinstance(v, bool) else str(v)


def check_types(method) -> None:
  """Raises a ValueError naming the field, its value and an example unless every field of the
  frozen dataclass ``method`` holds its annotated type (int, float, bool, str, or None where
  the annotation allows it); an int is a float, a bool is not a number."""
  for key, types in field_types(type(method)).items():
    v = getattr(method, key)
    if v is None and "None" in types:
      continue
    if "bool" in types:
      ok, kind = isinstance(v, (bool, np.bool_)), "true or false"
    elif "int" in types:
      ok, kind = not isinstance(v, (bool, np.bool_, str)) and hasattr(v, "__index__"), \
          "a whole number"
    elif "float" in types:
      kind = "a finite number"
      ok = not isinstance(v, (bool, np.bool_, str)) and hasattr(v, "__float__")
      ok = ok and math.isfinite(float(v))
    elif "str" in types:
      ok, kind = isinstance(v, str), "a string"
    else:
      continue
    if not ok:
      raise ValueError(f"{method.name}: {key} must be {kind}, got {v!r}: e.g. "
                       f"--method={method.name}:{key}={example(method, key)}")


def check_at_least(method, key: str, low: int, what: str) -> None:
  """Raises a ValueError unless ``method.<key> >= low``; ``what`` says what the field is."""
  v = getattr(method, key)
  if v < low:
    raise ValueError(f"{method.name}: {key} ({what}) must be >= {low}, got {v}: e.g. "
                     f"--method={method.name}:{key}={example(method, key)}")


def check_unit(method, key: str, what: str, *, closed: bool = True) -> None:
  """Raises a ValueError unless ``method.<key>`` is in [0, 1] (``closed=False``: [0, 1))."""
  v = getattr(method, key)
  if not (0.0 <= v <= 1.0 if closed else 0.0 <= v < 1.0):
    raise ValueError(f"{method.name}: {key} is {what}, in [0, 1{']' if closed else ')'}, got "
                     f"{v}: e.g. --method={method.name}:{key}={example(method, key)}")


def check_choice(method, key: str, choices, what: str) -> None:
  """Raises a ValueError unless ``method.<key>`` is one of ``choices``."""
  v = getattr(method, key)
  if v not in choices:
    raise ValueError(f"{method.name}: {key} ({what}) must be one of "
                     f"{', '.join(map(str, choices))}, got {v!r}: e.g. "
                     f"--method={method.name}:{key}={choices[0]}")


def size_warning(spec: str, cache_bytes: int, full_bytes: int,
                 prompt_tokens: int | None = None) -> str | None:
  """The warning to print and record when a compressed cache (``cache_bytes``, from its
  leaves) is larger than the full one (``full_bytes``), else None."""
  if cache_bytes <= full_bytes:
    return None
  on = f" on a {prompt_tokens}-token prompt" if prompt_tokens is not None else ""
  return (f"{spec}: the compressed cache ({cache_bytes / 1e6:.2f} MB) is larger than the full "
          f"cache ({full_bytes / 1e6:.2f} MB){on}: its fixed parts (projection bases, page "
          f"tables, scales, an empty window for later tokens, capacity rounding) outweigh what "
          f"it saves; compress longer prompts, or compare bytes at equal size")


@dataclasses.dataclass(frozen=True)
class Method:
  """Base class. Give exactly one of ``ratio`` (fraction of each row's tokens kept, in (0, 1])
  or ``budget`` (tokens kept per head)."""

  ratio: float | None = None
  budget: int | None = None

  name = "method"

  def __post_init__(self):
    check_types(self)
    if (self.ratio is None) == (self.budget is None):
      raise ValueError(f"{self.name}: give exactly one of ratio (fraction kept) or budget "
                       f"(tokens kept), got ratio={self.ratio}, budget={self.budget}")
    if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
      raise ValueError(f"{self.name}: ratio is the fraction of the cache kept and must be in "
                       f"(0, 1], got {self.ratio}")
    if self.budget is not None and self.budget < 1:
      raise ValueError(f"{self.name}: budget must be >= 1 token, got {self.budget}")
    if getattr(self, "gqa", "mean") not in GQA:
      raise ValueError(f"{self.name}: gqa (how a kv head's query group is reduced) must be "
                       f"one of {', '.join(GQA)}, got {getattr(self, 'gqa')!r}: e.g. "
                       f"--method={self.name}:gqa=max")

  # -- budget policy -----------------------------------------------------------------------
  def kept(self, lengths: np.ndarray) -> np.ndarray:
    """``lengths [L, B, K]`` (concrete) -> tokens kept per (layer, row, head)."""
    if self.budget is not None:
      if self.budget > lengths.max():
        raise ValueError(f"{self.name}: budget {self.budget} is larger than the prompt "
                         f"({int(lengths.max())} tokens): lower the budget or use ratio=1.0")
      return np.minimum(lengths, self.budget)
    return np.minimum(lengths, np.ceil(self.ratio * lengths).astype(np.int32))

  def budget_notes(self, lengths: np.ndarray, kept: np.ndarray) -> list[str]:
    """Warnings for ``lengths`` and budgets ``kept`` (``[L, B, K]``, host): a window or sinks
    the budget cannot hold (override; ``compress`` issues them as ``MethodWarning``)."""
    del lengths, kept
    return []

  # -- hooks (override) --------------------------------------------------------------------
  observe = None
  # True where ``scores(cache, obs, kept=[L, B, K])`` uses the budgets (SnapKV's window never
  # takes the whole budget); ``compress`` then passes them.
  scores_take_kept = False

  def scores(self, cache: KVCache, obs: Any) -> jax.Array:
    """``[L, B, K, S]`` keep-scores; every concrete method defines it."""
    raise TypeError(f"{type(self).__name__} must define scores(cache, obs)")


def select(cache: KVCache, scores: jax.Array, kept: jax.Array, capacity: int) -> KVCache:
  """Keeps the ``kept [L, B, K]`` best-scored valid slots per head in a cache of ``capacity``.

  Args:
    scores: ``[L, B, K, S]``; invalid slots (beyond ``lengths``) are never kept.
    capacity: static slot count of the result (>= kept.max()).

  Returns:
    A new cache ``[L, B, K, capacity, H]``; kept slots are in original-position order.
  """
  s_cap = cache.capacity
  valid = jnp.arange(s_cap)[None, None, None, :] < cache.lengths[..., None]
  s = jnp.where(valid, scores.astype(jnp.float32), NEG_INF)
  k = min(capacity, s_cap)
  _, idx = jax.lax.top_k(s, k)  # [L, B, K, k]
  kept = jnp.minimum(kept, cache.lengths)
  in_budget = jnp.arange(k)[None, None, None, :] < kept[..., None]
  pos = jnp.take_along_axis(cache.positions, idx, axis=-1)
  order = jnp.argsort(jnp.where(in_budget, pos, jnp.iinfo(jnp.int32).max), axis=-1)
  idx = jnp.take_along_axis(idx, order, axis=-1)
  gather = lambda x: jnp.take_along_axis(x, idx[..., None], axis=3)
  new_pos = jnp.where(in_budget, jnp.take_along_axis(cache.positions, idx, axis=-1), -1)
  out = cache.replace(keys=gather(cache.keys), values=gather(cache.values), positions=new_pos,
                      lengths=kept.astype(jnp.int32), scores=None if cache.scores is None else
                      jnp.take_along_axis(cache.scores, idx, axis=-1))
  return out.resize(capacity, check=False) if capacity > k else out


def check_hybrid(method) -> None:
  """Raises unless ``method`` can compress a hybrid cache (``KVCache.windows``: Gemma 3's
  sliding-window layers beside global ones). Token-selecting methods can: ``compress`` keeps
  each local layer's window (the only tokens it will attend to again) and lets the method
  choose on the global layers. Not yet: decode-time eviction (H2O, TOVA evict on every layer),
  data-dependent budgets across layers and heads (AdaKV), and stored parts (quantization,
  low-rank, channel pruning, depth merging: they would compress local layers too)."""
  for member in getattr(method, "methods", ()):  # Compose: every member, before any runs
    check_hybrid(member)
  why = None
  if hasattr(method, "update"):
    why = "it evicts during decoding, on every layer"
  elif hasattr(method, "budgets"):
    why = "it shares one budget across layers and heads"
  elif hasattr(method, "apply") and not hasattr(method, "methods"):
    why = "it stores the cache in a compact form on every layer (quantized / low-rank / merged)"
  if why is not None:
    raise ValueError(f"{getattr(method, 'name', type(method).__name__)} cannot compress a hybrid "
                     f"cache (sliding-window local layers beside global layers, Gemma 3) yet: "
                     f"{why}. Use a token-selecting method (snapkv, streaming_llm, knorm, "
                     f"expected_attention, keyformer, pyramidkv, kvzip), which compresses the "
                     f"global layers and keeps each local layer's window, or the full cache")


def keep_windows(kept: np.ndarray, lengths: np.ndarray, windows) -> np.ndarray:
  """Budgets ``kept [L, B, K]`` with every local layer's (``windows [L] > 0``) set to its
  window: ``min(length, window)``, the most recent tokens (``_compress`` forces them in).
  A local layer never attends further back, so this is lossless there; global layers keep
  the method's budget."""
  w = np.asarray(windows)[:, None, None]
  return np.where(w > 0, np.minimum(lengths, w), kept).astype(kept.dtype)


@functools.partial(jax.jit, static_argnames=("method", "capacity"))
def _compress(method, cache, obs, kept, capacity, scores=None):
  if hasattr(method, "carried_scores") and hasattr(method, "update"):
    # decode-time methods keep their statistic per slot (AdaKV over H2O carries it only while
    # compressing during prefill: its ragged cache does no decode-time eviction)
    cache = cache.replace(scores=method.carried_scores(cache, obs))
  if scores is None:
    scores = (method.scores(cache, obs, kept=kept) if getattr(method, "scores_take_kept", False)
              else method.scores(cache, obs))
  local = cache.local_layers
  if local.any():  # hybrid: a local layer keeps its most recent tokens (keep_windows)
    scores = jnp.where(jnp.asarray(local)[:, None, None, None], forced(cache.positions), scores)
  return select(cache, scores, kept, capacity)


def compress(method: Method, cache: KVCache, observations: Any = None, *, extra: int = 0,
             block: int = 512, final: bool = True) -> KVCache:
  """Applies ``method`` after prefill; returns a smaller cache with ``extra`` free slots.

  Args:
    method: a Method (or ``Compose``).
    observations: what the method's ``observe`` returned during prefill (or None).
    extra: free slots to leave for tokens appended later (question, answer).
    block: the model's attention block size (capacity is rounded to it).
    final: the result is the cache used for decoding (not handed to a later member of a
      composition): methods with ragged budgets then store it paged (``lib.paged``), unless
      pages would take more slots than the padded layout (``_pages_save``: short prompts).

  Warns (``MethodWarning``) where the method's window or sinks do not fit the budget
  (``Method.budget_notes``). On a hybrid cache (``cache.windows``, Gemma 3) local layers keep
  their window and the method compresses the global layers; methods that cannot raise
  (``check_hybrid``).
  """
  hybrid = bool(cache.local_layers.any())
  if hybrid:
    check_hybrid(method)
  if hasattr(method, "apply"):  # Compose and other multi-step methods
    return method.apply(cache, observations, extra=extra, block=block)
  lengths = to_host(cache.lengths)
  kept = method.kept(lengths)
  for note in method.budget_notes(lengths, kept):
    warn(note)
  if hybrid:
    kept = keep_windows(kept, lengths, cache.windows)
  scores = None
  if hasattr(method, "budgets"):  # data-dependent budgets (AdaKV): fetch them to size the cache
    budgets, scores = _budgets(method, cache, observations, jnp.asarray(kept, jnp.int32))
    kept = to_host(budgets)
  paged = final and getattr(method, "layout", None) == "paged" and _pages_save(
      kept, method.page, extra)
  capacity = round_capacity(int(kept.max()) + (0 if paged else extra), block)
  out = _compress(method, cache, observations, jnp.asarray(kept, jnp.int32), capacity, scores)
  if paged:  # only what each head keeps; later tokens go to a window of ``extra`` slots
    from kvlab.lib.paged import page_cache  # pylint: disable=g-import-not-at-top
    out = page_cache(out, page=method.page, room=extra, block=block,  # lengths as selected
                     host_lengths=np.minimum(kept, lengths))
  return out


def _pages_save(kept: np.ndarray, page: int, extra: int) -> bool:
  """Whether pages of ``page`` slots hold the budgets ``kept [L, B, K]`` (and a window of
  ``extra`` slots for later tokens) in fewer slots than the padded layout (every head at the
  largest budget + ``extra``). On short prompts rounding every head up to whole pages can take
  more than the full cache (PyramidKV at 0.5 of 35 tokens: 32 slots a head for 18 kept); the
  padded layout is then kept (the same tokens, fewer bytes)."""
  heads = kept.size
  paged = int((-(-kept.astype(np.int64) // page)).sum()) * page + heads * round_capacity(extra)
  return paged < heads * round_capacity(int(kept.max()) + extra)


@functools.partial(jax.jit, static_argnames=("method",))
def _budgets(method, cache, obs, kept):
  """``(budgets [L, B, K], scores [L, B, K, S] or None)``: a method that forms both from one
  pass (``scores_and_budgets``, AdaKV) hands its scores on, so ``_compress`` does not redo it."""
  if hasattr(method, "scores_and_budgets"):
    scores, budgets = method.scores_and_budgets(cache, obs, kept)
    return budgets, scores
  return method.budgets(cache, obs, kept), None


def merge_chunks(x: jax.Array) -> jax.Array:
  """``[chunks, L, B, T, ...]`` observations -> ``[L, B, chunks * T, ...]``."""
  x = jnp.moveaxis(x, 0, 2)  # [L, B, chunks, T, ...]
  return x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:])


def scale(h: int) -> float:
  """The attention score scale ``1 / sqrt(head_dim)`` for ``h = head_dim``."""
  return 1.0 / math.sqrt(h)


def evict_one(cache: KVCache, scores: jax.Array, when: jax.Array) -> KVCache:
  """Decode-time eviction: where ``when [L, B, K]``, drop the valid slot with the lowest
  ``scores [L, B, K, S]`` (``+inf`` protects a slot) by moving the last valid slot into it.

  Keeps the valid slots packed at the front; slot order is no longer position order.
  """
  s_cap = cache.capacity
  valid = jnp.arange(s_cap) < cache.lengths[..., None]
  victim = jnp.argmin(jnp.where(valid, scores, jnp.inf), axis=-1)  # [L, B, K]
  last = jnp.maximum(cache.lengths - 1, 0)

  hole = (jnp.arange(s_cap) == victim[..., None]) & when[..., None]  # [L, B, K, S]

  def move(x, extra_dims):
    tail = (1,) * extra_dims
    idx = jnp.broadcast_to(last.reshape(last.shape + (1,) + tail),
                           last.shape + (1,) + x.shape[4:])
    moved = jnp.take_along_axis(x, idx, axis=3)  # the last valid slot, [L, B, K, 1, ...]
    return jnp.where(hole.reshape(hole.shape + tail), moved, x)

  positions = move(cache.positions, 0)
  lengths = jnp.where(when, cache.lengths - 1, cache.lengths)
  positions = jnp.where(jnp.arange(s_cap) < lengths[..., None], positions, -1)
  return cache.replace(keys=move(cache.keys, 1), values=move(cache.values, 1),
                       positions=positions, lengths=lengths,
                       scores=None if cache.scores is None else move(cache.scores, 0))
