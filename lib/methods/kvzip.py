"""KVzip (Kim et al. 2025, arXiv 2505.23416): query-agnostic scores from context reconstruction.

After the context is prefilled, the model is asked to repeat it, one chunk at a time
(``"Repeat the previous context exactly."`` then the chunk's own tokens, teacher-forced). A
cached key-value pair's score is the largest attention any query of those repeats gives it,
maxed over each kv head's query group. Pairs the model needs to reproduce the context score
high whatever question comes later, which is what a query-agnostic cache should keep.

The repeats are extra forward passes of the model, so they are not an ``observe`` hook of the
context's own prefill: ``lib.protocol.reconstruction_scores`` runs them (each on a copy of the
cache, which is left as it was) with the ``max_attention`` hook here, and hands the result to
``KVzip.scores`` as its observations. Cost: about the context's prefill again, plus attention of
each repeated chunk over the whole context.

Choices (kvpress's ``KVzipPress`` port, read 2026-11-28, differs where noted):
  * chunk 2048 tokens; prompt "Repeat the previous context exactly." for the first chunk and
    "Repeat the part of the previous context exactly, starting with" + the previous chunk's
    last 8 tokens for the others, then the chat template's end of turn and assistant header
    (as kvpress). The repeats see the whole context, at positions after it.
  * Scores are the model's own attention probabilities (normalised over the whole cache and
    the repeat so far, as the forward pass computes them). kvpress's port normalises over the
    sinks, the chunk being repeated and the repeat only (a cheaper approximation).
  * Budgets: the same per head (``ratio`` of the context), like every uniform method here;
    ``share="layer"`` keeps one token set per layer (head-mean scores, as TOVA). kvpress
    spreads one budget over all layers and heads; ``adakv:scorer=kvzip`` gives per-head
    budgets within a layer.
  * The chat template's tokens before the user's content (the system prompt) and the first
    ``sinks`` tokens are always kept (kvpress forces 4 sinks and scores the template 0).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kvlab.lib.cache import KVCache
from kvlab.lib.methods.base import Method, check_at_least, forced, scale, sinks_note

SHARE = ("head", "layer")


@functools.lru_cache(maxsize=None)
def max_attention(block: int = 512):
  """Observe hook for the repeat passes: ``[B, K, S]`` the largest attention probability each
  cache slot gets from this chunk's real queries, maxed over each kv head's query group.

  The values are the forward pass's own probabilities: taken from the attention's pass where
  it kept them (``wants_probs``: a max over what it formed, no second ``q.k`` or ``exp``), else
  recomputed with its normaliser (``x.lse``) reading the cache ``block`` slots at a time
  (memory ``B * N * T * block``). The chunk's own keys get no score: they are the repeat,
  dropped after.
  """

  def observe(layer, x, cache):
    if x.probs is not None and x.probs.gumbel is None:
      return _kept_max(x, cache, x.probs)
    b, t, n, h = x.q.shape
    kh = cache.kv_heads
    g = n // kh
    at = lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)
    keys, lens = at(cache.keys), at(cache.lengths)  # [B, K, S, H], [B, K]
    s_cap = keys.shape[2]
    bs = min(block, s_cap)
    q = (x.q.astype(jnp.float32) * scale(h)).reshape(b, t, kh, g, h)
    lse = x.lse  # [B, K, G, T]
    real = x.valid[:, None, None, :, None]  # [B, 1, 1, T, 1]

    def one(i):
      start = jnp.minimum(i * bs, s_cap - bs)
      kb = jax.lax.dynamic_slice_in_dim(keys, start, bs, axis=2).astype(jnp.float32)
      z = jnp.einsum("BTKGH,BKSH->BKGTS", q, kb)
      ok = ((start + jnp.arange(bs))[None, None, :] < lens[..., None])[:, :, None, None, :]
      p = jnp.where(ok & real, jnp.exp(z - lse[..., None]), 0.0)
      return p.max(axis=(2, 3))  # [B, K, bs]

    n_blocks = -(-s_cap // bs)
    parts = jax.lax.map(one, jnp.arange(n_blocks))  # [nb, B, K, bs]
    if n_blocks * bs == s_cap:
      return jnp.moveaxis(parts, 0, 2).reshape(b, kh, s_cap)
    out = jnp.zeros((b, kh, s_cap), jnp.float32)  # an overlapping last block: max is exact
    for i in range(n_blocks):
      start = min(i * bs, s_cap - bs)
      out = out.at[..., start:start + bs].max(parts[i])
    return out

  observe.wants_probs = True
  return observe


def _kept_max(x, cache, pr):
  """``[B, K, S]`` max over real queries and each query group of the probabilities the
  attention kept (``lib.attention.KeptProbs``: per block ``p * exp(m - lse)``)."""
  b, kh, _, _ = pr.self_m.shape
  s_cap, bs = cache.capacity, pr.block
  real = x.valid[:, None, None, :, None]  # [B, 1, 1, T, 1]

  def one(i, out):  # an overlapping last block holds zeros where read before: max is exact
    sc = jnp.exp(pr.blocks_m[i] - pr.lse)[..., None]  # [B, K, G, T, 1]
    m = jnp.where(real, pr.blocks_p[i] * sc, 0.0).max(axis=(2, 3))  # [B, K, bs]
    start = jnp.minimum(i * bs, s_cap - bs)
    cur = jax.lax.dynamic_slice_in_dim(out, start, bs, axis=2)
    return jax.lax.dynamic_update_slice_in_dim(out, jnp.maximum(cur, m), start, axis=2)

  return jax.lax.fori_loop(0, pr.n_blocks, one, jnp.zeros((b, kh, s_cap), jnp.float32))


@dataclasses.dataclass(frozen=True)
class KVzip(Method):
  """KVzip: keep the pairs the model attends to most while repeating the context (see the
  module docstring). Observations: ``{"scores": [L, B, K, S], "prefix": [B]}`` from
  ``lib.protocol.reconstruction_scores``; ``chunk`` is the repeat's length in tokens."""

  chunk: int = 2048
  share: str = "head"
  sinks: int = 4
  name = "kvzip"
  reconstructs = True  # the protocol runs the repeats (``lib.protocol.reconstruction_scores``)

  def __post_init__(self):
    super().__post_init__()
    check_at_least(self, "chunk", 1, "tokens repeated per pass")
    if self.share not in SHARE:
      raise ValueError(f"kvzip: share must be one of {', '.join(SHARE)} (one token set per kv "
                       f"head or per layer), got {self.share!r}: e.g. "
                       "--method=kvzip:share=layer")
    check_at_least(self, "sinks", 0, "first tokens always kept")

  def budget_notes(self, lengths, kept):
    return sinks_note(self, lengths, kept, "by the repeat scores")

  def head_scores(self, cache: KVCache, obs):
    """``[L, B, K, S]`` the repeat scores of each kv head, ``2**23 + position`` on the slots
    always kept (the first ``sinks`` and the template prefix): AdaKV's per-head input."""
    s = obs["scores"]
    if s.shape != cache.positions.shape:
      raise ValueError(f"kvzip: reconstruction scores {s.shape} do not match the cache "
                       f"{cache.positions.shape}: form them on this cache with "
                       "lib.protocol.reconstruction_scores")
    keep = (cache.positions < jnp.maximum(self.sinks, obs["prefix"])[None, :, None, None]) & (
        cache.positions >= 0)
    return jnp.where(keep, forced(cache.positions), s)

  def scores(self, cache: KVCache, obs):
    s = self.head_scores(cache, obs)
    if self.share == "head":
      return s
    keep = s >= forced(jnp.zeros((), jnp.int32))
    return jnp.where(keep, s, jnp.broadcast_to(s.mean(2, keepdims=True), s.shape))


def reconstructor(method) -> KVzip | None:
  """The member of ``method`` (itself, a ``Compose`` member or AdaKV's scorer) whose scores
  come from context reconstruction, or None."""
  for m in getattr(method, "methods", (method,)):
    inner = getattr(m, "inner", None) if not isinstance(m, KVzip) else m
    if isinstance(inner, KVzip):
      return inner
  return None
