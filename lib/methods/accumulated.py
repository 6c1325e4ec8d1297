"""Accumulated-attention scorers: H2O and Keyformer.

Their score of a token is the attention it received from every prompt query, summed. We never
build the S x S matrix: during chunked prefill, each chunk's queries are softmaxed over the cache
so far plus the chunk itself (causal), and the column sums are written at the slots the chunk's
keys will occupy. Summing the per-chunk sums gives the exact full-prompt column sums.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from kvlab.lib.attention import block_scores, cache_block, store_block_size
from kvlab.lib.gumbel import gumbel_noise, hash_salts, query_head_ids
from kvlab.lib.cache import KVCache
from kvlab.lib.methods.base import Method, check_at_least, check_unit, evict_one, forced
from kvlab.pallas_kernels import platform as platform_lib
from kvlab.pallas_kernels.column_sums import column_sums as column_sums_kernel
from kvlab.pallas_kernels.column_sums import row_lse as row_lse_kernel


# How H2O's, TOVA's and Keyformer's column sums are formed. "kept": from the probabilities the
# attention's pass kept (``KeptProbs``); "own": the hook's own blockwise pass
# (``_column_sums``); "kernel": the fused Pallas passes (``pallas_kernels.column_sums``: nothing
# ``T x S`` written), "interpret" the same on CPU (tests); "auto" (the default): the kernel for
# the plain sums on one GPU, kept probabilities elsewhere and for Keyformer's Gumbel sums.
# Measured at 4k, bf16, on an H200 (2026-11-27, results/bench_compress_twin_bf16_*_h200.json):
# h2o's overhead is 3.0 % of the prefill with the kernel, 63 % kept, 43 % own; keyformer's 123 %
# with the kernel (its row pass plus the hashed noise in both passes), 87 % kept, 92 % own, so
# "auto" leaves Keyformer on "kept". On the 2-core CPU "kept" (13-16 % for h2o) beats "own"
# (22 %). Set by ``bench_compress --column_sums``.
COLUMN_SUMS = "auto"
IMPLS = ("auto", "kept", "own", "kernel", "interpret")


def resolve_impl(impl: str | None = None, gumbel: bool = False) -> str:
  """The column-sum path a hook made now takes: ``impl`` (None: ``COLUMN_SUMS``), "auto"
  resolved for JAX's default backend and for the kind of sums (``gumbel``: Keyformer's)."""
  impl = COLUMN_SUMS if impl is None else impl
  if impl not in IMPLS:
    raise ValueError(f"column sums impl {impl!r}: use one of {', '.join(IMPLS)}")
  if impl == "auto":  # one GPU: the kernel. Sharded over several it would need a shard_map
    # wrapper (as pallas_kernels.sharded gives the decode kernels), not written: "kept" there.
    gpu = jax.default_backend() in platform_lib.GPU and jax.device_count() == 1
    impl = "kernel" if gpu and not gumbel else "kept"
  return impl


def column_sums(gumbel_tau: float | None = None, seed: int = 0, impl: str | None = None):
  """Observe hook: ``[B, K, S]`` attention mass each cache slot receives from this chunk's
  queries (mean over each GQA group). Without ``gumbel_tau`` the probabilities are the
  attention's own; with it they are Keyformer's Gumbel-softmax ``softmax((s + G) / tau)``.
  ``impl``: how they are formed (``COLUMN_SUMS``; None: its current value, read when the hook
  is made)."""
  return _hook(gumbel_tau, seed, resolve_impl(impl, gumbel=gumbel_tau is not None))


@functools.lru_cache(maxsize=None)
def _hook(gumbel_tau: float | None, seed: int, impl: str):
  """The hook of ``column_sums`` for a resolved ``impl``.

  The Gumbel noise ``G`` is a counter-based hash of (seed, layer, query head, query position,
  key position) (``gumbel_noise``), so every pass sees the same noise without storing it.

  "kept": both kinds come from probabilities the attention's pass formed (``wants_probs`` /
  ``wants_gumbel_probs``; ``_kept_column_sums``), so ``q.k`` is not recomputed. Otherwise (a
  stored cache, past ``models.decoder.PROBS_MAX_BYTES``, two Keyformer settings in one
  prefill, or "own") the hook forms ``exp(s - lse)`` in its own blockwise pass
  (``_column_sums``; one more for the Gumbel normaliser), holding nothing ``T x S`` beyond one
  block. "kernel" / "interpret": ``_kernel_column_sums`` on a plain cache (a stored one takes
  the own pass): the attention's ``lse`` for the plain sums, a row pass for Keyformer's."""

  spec = None if gumbel_tau is None else (float(gumbel_tau), int(seed))

  fused = impl in ("kernel", "interpret")

  def observe(layer, x, cache):
    # The kernel takes a static window; a hybrid model's (Gemma 3) is per layer, traced.
    static_window = x.sliding_window is None or isinstance(x.sliding_window, int)
    if fused and cache.quant is None and x.lse is not None and static_window:
      return _kernel_column_sums(layer, x, cache, interpret=impl == "interpret", gumbel=spec)
    if spec is None:
      if x.probs is not None:  # the attention kept its softmax: nothing to recompute
        return _kept_column_sums(layer, x, cache, x.probs)
      return _column_sums(layer, x, cache)
    if x.gumbel_probs is not None and x.gumbel_probs.gumbel == spec:
      return _kept_column_sums(layer, x, cache, x.gumbel_probs)  # formed in the attention pass
    return _column_sums(layer, x, cache, gumbel=spec)

  # With "kept", both kinds come from the attention's own pass over the scores: plain sums from
  # its softmax, Keyformer's from a second online softmax of (s + G) / tau beside it (no second
  # q.k pass and one noise draw per pair; the hook's own pass above needs two of each).
  observe.wants_probs = spec is None and impl == "kept"
  observe.wants_gumbel_probs = spec if impl == "kept" else None
  observe.impl = impl
  return observe


def _kernel_column_sums(layer, x, cache, interpret: bool = False, gumbel=None):
  """Column sums (``[B, K, S]``, as ``_column_sums``) from the fused Pallas pass over this
  layer's cache slots and the chunk's own keys (``pallas_kernels.column_sums``), with the
  attention's ``lse``; for Keyformer (``gumbel=(tau, seed)``) the Gumbel-softmax's own
  normaliser from a row pass first (``row_lse``). Nothing ``T x S`` is written."""
  b, t, n, h = x.q.shape
  kh = x.k.shape[1]
  g = n // kh
  rows = lambda a: jnp.broadcast_to(a, (b, kh, g, t)).reshape(b, kh, g * t)
  q = x.q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
  w = rows(x.valid[:, None, None, :].astype(jnp.float32) / g)  # real queries, group mean
  at = lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)
  lens, s_cap = at(cache.lengths), cache.capacity  # [B, K]
  new = lambda a: jnp.broadcast_to(a[:, None, :], (b, kh, t))
  keys = jnp.concatenate([at(cache.keys), x.k.astype(cache.keys.dtype)], axis=2)
  k_pos = jnp.concatenate([at(cache.positions), new(x.positions)], axis=2)
  k_ok = jnp.concatenate([jnp.arange(s_cap) < lens[..., None], new(x.valid)], axis=2)
  q_pos = rows(x.positions[:, None, None, :])
  kw = dict(window=x.sliding_window, interpret=interpret)
  if gumbel is None:
    lse = x.lse.reshape(b, kh, g * t)
  else:
    tau, seed = gumbel
    heads = rows(query_head_ids(kh, g)[None, :, :, None])
    row_salt, col_salt = hash_salts(seed, layer, heads, q_pos, k_pos)
    kw.update(tau=tau, salts=(row_salt, col_salt))
    lse = row_lse_kernel(q, q_pos, keys, k_pos, k_ok, **kw)
  col = column_sums_kernel(q, lse, q_pos, w, keys, k_pos, k_ok, **kw)
  return col[..., :s_cap] + _place_new(col[..., s_cap:], lens, s_cap)


def _kept_column_sums(layer, x, cache, pr):
  """Column sums (``[B, K, S]``, as ``_column_sums``) from probabilities the attention kept
  (``pr``: ``x.probs``, or ``x.gumbel_probs`` for Keyformer): each part's ``exp(z - m)``
  weighted per query by ``exp(m - lse)``, summed over the real queries, averaged over each GQA
  group. Never recomputes ``q.k``."""
  f32 = jnp.float32
  b, kh, g, _ = pr.self_m.shape
  s_cap, bs = cache.capacity, pr.block
  qw = x.valid.astype(f32)[:, None, None, :] / g  # [B, 1, 1, T]: real queries, group mean

  def add_block(i, col):  # the last block may overlap an earlier one (zeros there)
    sc = jnp.exp(pr.blocks_m[i] - pr.lse)  # folds into the query weights: no [.., T, bs] product
    c = jnp.einsum("BKGT,BKGTS->BKS", qw * sc, pr.blocks_p[i])
    start = jnp.minimum(i * bs, s_cap - bs)
    cur = jax.lax.dynamic_slice_in_dim(col, start, bs, axis=2)
    return jax.lax.dynamic_update_slice_in_dim(col, cur + c, start, axis=2)

  col = jax.lax.fori_loop(0, pr.n_blocks, add_block, jnp.zeros((b, kh, s_cap), f32))
  lens = jax.lax.dynamic_index_in_dim(cache.lengths, layer, 0, keepdims=False)  # [B, K]
  new = jnp.einsum("BKGT,BKGTU->BKU", qw * jnp.exp(pr.self_m - pr.lse), pr.self_p)
  return col + _place_new(new, lens, s_cap)


def _place_new(col_new, lens, s_cap):
  """``[B, K, T]`` sums of the chunk's own keys -> ``[B, K, S]`` at slots ``[lens, lens + T)``."""
  b, kh, t = col_new.shape
  place = jax.vmap(jax.vmap(lambda z, new, start: jax.lax.dynamic_update_slice(z, new, (start,))))
  return place(jnp.zeros((b, kh, s_cap + t), jnp.float32), col_new, lens)[..., :s_cap]


def _column_sums(layer, x, cache, block: int = 512, gumbel=None):
  """Column sums of this chunk's attention (or Gumbel-softmax with ``gumbel=(tau, seed)``)
  over the valid cache blocks and the chunk itself. Masks as attention does (validity,
  causality, sliding window).

  Returns ``[B, K, S]``; with a KIVI store in ``cache.quant`` (``QuantStore``, read dequantized
  one block at a time), ``[B, K, Q + S]``: the store's Q slots first, then the window's S."""
  q, k_new = x.q, x.k
  b, t, n, h = q.shape
  kh = k_new.shape[1]
  g = n // kh
  f32 = jnp.float32
  qg = (q.astype(f32) / math.sqrt(h)).reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)
  qpos = x.positions[:, None, None, :, None]  # [B, 1, 1, T, 1]
  qok = x.valid[:, None, None, :, None]
  win = x.sliding_window
  window_ok = (lambda kp: True) if win is None else (lambda kp: (qpos - kp) < win)
  lens = jax.lax.dynamic_index_in_dim(cache.lengths, layer, 0, keepdims=False)  # [B, K]
  heads = query_head_ids(kh, g)[None, :, :, None, None]

  def logits(s, kpos):  # s [B, K, G, T, S], kpos broadcastable to it
    if gumbel is None:
      return s
    tau, seed = gumbel
    return (s + gumbel_noise(seed, layer, heads, qpos, kpos)) / tau

  def scored(kb, pb, ok):  # one block of keys -> (logits, allowed) [B, K, G, T, bs]
    kpos = pb[:, :, None, None, :]
    ok = ok[:, :, None, None, :] & qok & window_ok(kpos)
    return logits(block_scores(qg, kb.astype(f32)), kpos), ok

  # Parts of the cache: (slots, block size, blocks to visit, block i -> (start, logits, ok)).
  s_cap = cache.capacity
  bs = min(block, s_cap)

  def window_block(i):
    kb, pb, ok = cache_block(cache.keys, cache.positions, lens, layer, i, bs)
    return jnp.minimum(i * bs, s_cap - bs), *scored(kb, pb, ok)

  parts = [(s_cap, bs, (jnp.max(lens) + bs - 1) // bs, window_block)]
  store = cache.quant
  if store is not None:
    if not hasattr(store, "k_codes"):
      raise ValueError(f"attention column sums read a plain cache or a KIVI store, got "
                       f"{type(store).__name__}: compress before any other stored form")
    q_lens = jax.lax.dynamic_index_in_dim(store.lengths, layer, 0, keepdims=False)  # [B, K]
    qbs = store_block_size(store, block)

    def store_block(i):  # whole groups, dividing the store: no overlap
      kb, _, pb = store.read(layer, i * qbs, qbs)
      ok = (i * qbs + jnp.arange(qbs))[None, None, :] < q_lens[..., None]
      return i * qbs, *scored(kb, pb, ok)

    parts.insert(0, (store.capacity, qbs, (jnp.max(q_lens) + qbs - 1) // qbs, store_block))

  kpos_new = x.positions[:, None, None, None, :]
  ok_new = jnp.tril(jnp.ones((t, t), bool))[None, None, None] & qok & window_ok(kpos_new)
  z_new = logits(jnp.einsum("BKGTH,BKUH->BKGTU", qg, k_new.astype(f32)), kpos_new)

  if gumbel is None and x.lse is not None:
    lse = x.lse  # [B, K, G, T]
  else:  # the normaliser of these logits: one more online pass
    m = jnp.where(ok_new, z_new, -jnp.inf).max(-1)  # the diagonal is always allowed
    l = jnp.where(ok_new, jnp.exp(z_new - m[..., None]), 0.0).sum(-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # padded queries: nothing allowed
    for _, _, n_blocks, part in parts:
      def fold(i, carry, part=part):
        m, l = carry
        _, z, ok = part(i)
        m_new = jnp.maximum(m, jnp.where(ok, z, -jnp.inf).max(-1))
        return m_new, l * jnp.exp(m - m_new) + jnp.where(ok, jnp.exp(z - m_new[..., None]),
                                                         0.0).sum(-1)
      m, l = jax.lax.fori_loop(0, n_blocks, fold, (m, l))
    lse = m + jnp.log(jnp.maximum(l, 1e-30))

  outs = []
  for size, pbs, n_blocks, part in parts:
    def body(i, out, part=part, pbs=pbs):
      start, z, ok = part(i)  # an overlapping last block adds 0 where it was read before
      p = jnp.where(ok, jnp.exp(z - lse[..., None]), 0.0)
      cur = jax.lax.dynamic_slice(out, (0, 0, start), (b, kh, pbs))
      return jax.lax.dynamic_update_slice(out, cur + p.sum(3).mean(2), (0, 0, start))
    outs.append(jax.lax.fori_loop(0, n_blocks, body, jnp.zeros((b, kh, size), f32)))
  p = jnp.where(ok_new, jnp.exp(z_new - lse[..., None]), 0.0)
  outs[-1] = outs[-1] + _place_new(p.sum(3).mean(2), lens, s_cap)
  return jnp.concatenate(outs, axis=-1) if len(outs) > 1 else outs[0]


def _recent_mask(cache: KVCache, kept_fraction_of_len, recent_fraction: float):
  """``[L, B, K, S]``: the ``recent_fraction`` most recent tokens of each row's budget."""
  n = cache.next_position.astype(jnp.float32)  # [B]
  recent = jnp.ceil(kept_fraction_of_len(n) * recent_fraction)
  return cache.positions >= (n - recent)[None, :, None, None]


@dataclasses.dataclass(frozen=True)
class H2O(Method):
  """H2O (Zhang et al. 2023) at prefill: heavy hitters by attention summed over all prompt
  queries, plus the most recent tokens. Choice: half the budget is the recent window
  (``recent_fraction=0.5``, the paper's heavy_ratio = recent_ratio)."""

  recent_fraction: float = 0.5
  name = "h2o"

  def __post_init__(self):
    super().__post_init__()
    check_unit(self, "recent_fraction", "the part of the budget kept for the newest tokens")

  @property
  def observe(self):
    return column_sums()

  def _fraction(self, n):
    return self.ratio * n if self.ratio is not None else jnp.minimum(n, self.budget)

  def scores(self, cache: KVCache, obs):
    s = obs.sum(0)  # [L, B, K, S] summed over chunks
    return jnp.where(_recent_mask(cache, self._fraction, self.recent_fraction),
                     forced(cache.positions), s)

  def carried_scores(self, cache: KVCache, obs):
    return obs.sum(0)

  def update(self, cache: KVCache, obs):
    """Decode time: add this step's attention to each slot's score; once the cache is full,
    evict the lowest-scored slot outside the recent window (``recent_fraction`` of the
    capacity), so the next token always has a free slot."""
    acc = (0.0 if cache.scores is None else cache.scores) + obs  # obs [L, B, K, S]
    recent = max(1, int(self.recent_fraction * cache.capacity))
    protect = cache.positions >= (cache.next_position - recent)[None, :, None, None]
    cache = cache.replace(scores=acc)
    return evict_one(cache, jnp.where(protect, jnp.inf, acc), cache.lengths >= cache.capacity)


@dataclasses.dataclass(frozen=True)
class Keyformer(Method):
  """Keyformer (Adnan et al. 2024) at prefill: accumulated Gumbel-softmax scores
  (``tau_init=1.0`` at the prompt) plus a recent window of 30 % of the budget (authors' cfg)."""

  recent_fraction: float = 0.3
  tau: float = 1.0
  seed: int = 0
  name = "keyformer"

  def __post_init__(self):
    super().__post_init__()
    check_unit(self, "recent_fraction", "the part of the budget kept for the newest tokens")
    if not self.tau > 0:
      raise ValueError(f"keyformer: tau (the Gumbel-softmax temperature) must be > 0, got "
                       f"{self.tau}: e.g. --method=keyformer:tau=1.0")
    check_at_least(self, "seed", 0, "the Gumbel noise's seed")

  @property
  def observe(self):
    return column_sums(self.tau, self.seed)

  def _fraction(self, n):
    return self.ratio * n if self.ratio is not None else jnp.minimum(n, self.budget)

  def scores(self, cache: KVCache, obs):
    s = obs.sum(0)
    return jnp.where(_recent_mask(cache, self._fraction, self.recent_fraction),
                     forced(cache.positions), s)
