"""Compress during chunked prefill and quantize what is kept after every chunk (evict + KIVI).

``lib.online`` evicts after each chunk and packs the kept tokens once at the end, so its float
cache peaks at budget + one chunk for every layer. Here the scan carries the kept tokens packed
(a ``QuantStore`` of at most the budget) plus a full-precision window of ``residual + group +
chunk`` slots; the float cache never holds more than that window per layer. After each chunk,
one layer at a time (``lax.map``, so only one layer is ever dequantized):

  1. the store's codes are dequantized and joined with the window (store tokens first, all
     older than the window's), giving a plain one-layer cache of ``Q + W`` slots;
  2. the method scores it (with that layer's slice of the chunk's observations) and ``select``
     keeps its budget, in original-position order;
  3. the kept tokens are split as ``KIVI.apply`` splits them: the oldest
     ``floor((n - residual) / group) * group`` are quantized into a new store, the rest stay in
     full precision.

Approximations, on top of those ``lib.online`` lists for every method (choice made here, not in
METHODS.md): scorers see the dequantized keys of tokens kept earlier, not their float keys, and
the later chunks attend to the quantized tokens (as decoding from a KIVI cache would). KIVI's
values are quantized per token, so re-quantizing a kept token reproduces its codes (up to the
float16 scales). Its keys are quantized per channel over groups of ``group`` tokens: after an
eviction the surviving tokens form new groups, so a token's key is re-quantized with new
neighbours once per chunk and its rounding compounds. So between chunks the keys are packed at
KIVI's ``prefill_key_bits`` (8 by default: the compounding is then 1/64 of a 2-bit step) and
re-packed at ``bits`` once, when the prefill ends (``pack_keys``); ``prefill_key_bits=bits``
gives the smallest peak instead. ``experiments/evaluate.py --compress_during_prefill
--quantize_each_chunk`` measures the cost next to quantizing once.

H2O and Keyformer carry their accumulated attention per slot beside the scan's cache, the
store's slots first (``[L, B, K, Q + W]``); their hook sums each chunk's attention over the
store's dequantized blocks and the window (``lib.methods.accumulated._column_sums``), and the
sums move with the tokens at every selection.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from kvlab.lib.cache import KVCache, round_capacity
from kvlab.lib.memory import check_fits, explain_oom
from kvlab.lib.methods.base import select
from kvlab.lib.online_chunk import chunk_forward, initial_accumulator
from kvlab.lib.quant.store import QuantStore, first_slots, split_window
from kvlab.lib.quant.uniform import quantize


def quantized_capacities(kivi, top: int, chunk: int) -> tuple[int, int]:
  """``(store slots Q, window slots W)`` for a final budget of at most ``top`` tokens per head:
  the store holds whole groups of the oldest kept tokens (``floor((top - residual) / group)``
  of them, at least one group), the window the rest (< residual + group) plus one chunk."""
  g, r = kivi.group, kivi.residual
  return max(g, max(top - r, 0) // g * g), round_capacity(r + g + chunk)


def empty_store(kivi, *, num_layers: int, batch: int, kv_heads: int, q_cap: int,
                head_dim: int) -> QuantStore:
  """A ``QuantStore`` of ``q_cap`` free slots per (layer, row, head): keys at KIVI's
  ``prefill_key_bits``, values at its ``bits``, its group.

  Built as zeros of the shapes ``QuantStore.build`` gives (positions -1), not by quantizing
  zeros: inside ``jit`` XLA would constant-fold that quantization at compile time (minutes at
  the default model's 8k context)."""
  shape = (num_layers, batch, kv_heads, q_cap, head_dim)
  like = jax.eval_shape(lambda: QuantStore.build(
      jnp.zeros(shape), jnp.zeros(shape), jnp.zeros(shape[:-1], jnp.int32),
      jnp.zeros(shape[:3], jnp.int32), k_bits=kivi.prefill_key_bits, v_bits=kivi.bits,
      group=kivi.group, residual=kivi.residual))
  fill = lambda x: jnp.full(x.shape, -1 if x.dtype == jnp.int32 and x.ndim == 4 else 0, x.dtype)
  return jax.tree.map(fill, like)


def _joined_layer(cache: KVCache, layer, carried=None) -> KVCache:
  """Layer ``layer`` of a quantized cache as a plain one-layer cache ``[1, B, K, Q + W, H]``:
  the store's dequantized tokens at slots ``[0, n_q)``, the window's right after them; with
  ``carried [B, K, Q + W]`` (store slots, then window slots) its ``scores`` moved alike."""
  store = cache.quant
  q_cap = store.capacity
  kq, vq, pq = store.read(layer, 0, q_cap)  # [B, K, Q, H] float32, [B, K, Q]
  at = lambda x: jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
  n_q, n_w = at(store.lengths), at(cache.lengths)  # [B, K]
  keys = jnp.concatenate([kq.astype(cache.keys.dtype), at(cache.keys)], axis=2)
  values = jnp.concatenate([vq.astype(cache.values.dtype), at(cache.values)], axis=2)
  positions = jnp.concatenate([pq, at(cache.positions)], axis=2)
  j = jnp.arange(keys.shape[2])
  idx = jnp.where(j < n_q[..., None], j, q_cap + j - n_q[..., None])
  idx = jnp.minimum(idx, keys.shape[2] - 1)  # [B, K, Q + W]
  n = n_q + n_w
  valid = j < n[..., None]
  take = lambda x: jnp.take_along_axis(x, idx[..., None], axis=2)
  scores = None if carried is None else jnp.take_along_axis(carried, idx, axis=2)[None]
  return KVCache(keys=take(keys)[None], values=take(values)[None],
                 positions=jnp.where(valid, jnp.take_along_axis(positions, idx, axis=2), -1)[None],
                 lengths=n[None], next_position=cache.next_position, scores=scores,
                 windows=cache.windows)


def recompress_quantized(method, kivi, cache: KVCache, obs, now, carried=None):
  """Scores, selects ``now [L, B, K]`` tokens and re-quantizes, one layer at a time.

  Args:
    cache: window ``[L, B, K, W, H]`` + ``cache.quant`` (``QuantStore`` of Q slots).
    obs: the method's observations stacked ``[1, L, ...]`` (or None).
    carried: H2O / Keyformer: ``[L, B, K, Q + W]`` per-slot accumulated attention, the store's
      slots first (``_column_sums`` of a quantized cache); it is the methods' observation.

  Returns:
    ``(cache, carried)``: the cache of the same shapes holding at most ``now`` tokens per head
    (the oldest whole groups beyond the ``residual`` newest packed, the rest in the window),
    and ``carried`` moved with the tokens it scores (None without it).
  """
  q_cap, w_cap = cache.quant.capacity, cache.capacity
  g, r = kivi.group, kivi.residual
  per_layer_obs = None if obs is None else jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), obs)

  def one_layer(args):
    layer, obs_l, now_l, carried_l = args
    joined = _joined_layer(cache, layer, carried_l)
    if carried_l is None:
      obs_l = None if obs_l is None else jax.tree.map(lambda x: x[:, None], obs_l)
    else:
      obs_l = joined.scores[None]
    sel = select(joined, method.scores(joined, obs_l), now_l[None], joined.capacity)
    n_q = jnp.maximum(sel.lengths - r, 0) // g * g  # [1, B, K]
    take = lambda x: first_slots(x, q_cap)
    store = QuantStore.build(take(sel.keys), take(sel.values), take(sel.positions), n_q,
                             k_bits=cache.quant.k_bits, v_bits=kivi.bits, group=g, residual=r,
                             scale_dtype=cache.quant.k_scale.dtype)
    win = split_window(sel, n_q, w_cap, store)
    drop = lambda tree: jax.tree.map(lambda x: x[0], tree)
    moved = None
    if carried_l is not None:  # back to the raw layout: store slots, then window slots
      j = jnp.arange(q_cap)[None, None, None]
      in_store = jnp.where(j < n_q[..., None], sel.scores[..., :q_cap], 0.0)
      jw = jnp.arange(w_cap)[None, None, None]
      idx = jnp.minimum(n_q[..., None] + jw, sel.capacity - 1)
      in_win = jnp.where(jw < win.lengths[..., None],
                         jnp.take_along_axis(sel.scores, idx, axis=-1), 0.0)
      moved = jnp.concatenate([in_store, in_win], axis=-1)[0]
    return drop((win.keys, win.values, win.positions, win.lengths)), drop(store), moved

  layers = jnp.arange(cache.num_layers)
  (keys, values, positions, lengths), store, carried = jax.lax.map(
      one_layer, (layers, per_layer_obs, now, carried))
  return cache.replace(keys=keys, values=values, positions=positions, lengths=lengths,
                       quant=store), carried


@functools.partial(jax.jit, static_argnames=("apply_fn", "chunk_size", "method", "kivi", "q_cap",
                                             "w_cap", "dtype", "num_layers", "kv_heads",
                                             "head_dim"))
def prefill_compressing_quantized(params, tokens, lengths, kept, *, apply_fn, chunk_size: int,
                                  method, kivi, q_cap: int, w_cap: int, dtype=jnp.float32,
                                  num_layers: int = 0, kv_heads: int = 0, head_dim: int = 0):
  """Chunked prefill that evicts with ``method`` and quantizes with ``kivi`` after every chunk.

  Args:
    tokens: ``[B, S]`` right-padded prompt, S a multiple of ``chunk_size``; ``lengths [B]``.
    kept: ``[L, B, K]`` final budgets (``lib.online.online_capacity``).
    q_cap, w_cap: static store and window slots (``quantized_capacities``).

  Returns:
    ``(last_logits [B, V], cache)``: ``cache.quant`` a ``QuantStore`` of Q slots, the window W
    slots; together at most ``kept`` tokens per head.
  """
  b, s = tokens.shape
  nc = s // chunk_size
  chunks = tokens.reshape(b, nc, chunk_size).transpose(1, 0, 2)
  starts = jnp.arange(nc, dtype=jnp.int32) * chunk_size
  cache = KVCache.init(num_layers=num_layers, batch=b, kv_heads=kv_heads, capacity=w_cap,
                       head_dim=head_dim, dtype=dtype,
                       windows=getattr(apply_fn, "layer_windows", None))
  cache = cache.replace(quant=empty_store(kivi, num_layers=num_layers, batch=b,
                                          kv_heads=kv_heads, q_cap=q_cap, head_dim=head_dim))
  carried = None
  if hasattr(method, "carried_scores"):  # H2O / Keyformer: per-slot sums, store slots first
    carried = jnp.zeros((num_layers, b, kv_heads, q_cap + w_cap), jnp.float32)

  def step(carry, xs):
    cache, acc, carried = carry
    logits, cache, obs, acc, n_valid = chunk_forward(params, apply_fn, method, cache, acc, xs,
                                                     lengths, chunk_size)
    stacked = None if obs is None else jax.tree.map(lambda x: x[None], obs)
    if carried is not None:  # this chunk's column sums add to the carried per-slot sums
      carried, stacked = carried + obs, None
    total = cache.quant.lengths + cache.lengths
    now = jnp.minimum(kept, total)  # as lib.online: rows whose prompt ended keep all they hold
    now = jnp.where((n_valid > 0)[None, :, None], now, total)
    cache, carried = recompress_quantized(method, kivi, cache, stacked, now, carried)
    return (cache, acc, carried), logits

  acc0 = initial_accumulator(params, apply_fn, method, cache, chunks[0], lengths)
  (cache, _, _), logits = jax.lax.scan(step, (cache, acc0, carried), (chunks, starts))
  last_chunk = (lengths - 1) // chunk_size
  return logits[last_chunk, jnp.arange(b)], cache.replace(quant=pack_keys(cache.quant, kivi.bits))


def pack_keys(store: QuantStore, bits: int) -> QuantStore:
  """``store`` with its keys re-packed once at ``bits`` (from ``prefill_key_bits``), one layer
  at a time (``lax.map``: one layer's keys dequantized at once); values, positions, lengths
  unchanged. The store as it is when its keys are already at ``bits``."""
  if store.k_bits == bits:
    return store
  g = store.group

  def one_layer(layer):
    keys, _, _ = store.read(layer, 0, store.capacity)  # [B, K, Q, H] float32
    kq = quantize(keys, bits, g, -2)
    return kq.codes, kq.scale.astype(store.k_scale.dtype), kq.zero.astype(store.k_zero.dtype)

  codes, scale, zero = jax.lax.map(one_layer, jnp.arange(store.k_codes.shape[0]))
  return store.replace(k_codes=codes, k_scale=scale, k_zero=zero, k_bits=bits)


def check_quantizable_each_chunk(method, quantizers) -> None:
  """Raises ``ValueError`` naming the fix unless ``quantizers`` is one KIVI quantizer (every
  eviction method ``split_online`` accepts works here)."""
  del method
  from kvlab.lib.methods.kivi import KIVI  # pylint: disable=g-import-not-at-top
  if len(quantizers) != 1 or not isinstance(quantizers[0], KIVI):
    names = "+".join(q.name for q in quantizers) or "none"
    raise ValueError(f"quantizing after every chunk takes one KIVI quantizer (kivi, kivi4), got "
                     f"{names}: compose e.g. snapkv+kivi, or quantize once at the end "
                     "(drop --quantize_each_chunk)")


def prefill_quantizing(params, apply_fn, tokens, lengths, kept, top, method, kivi, chunk, dtype,
                        num_layers, kv_heads, head_dim):
  """``lib.online.prefill_context_compressing`` with ``quantize_each_chunk`` (host wrapper of
  ``prefill_compressing_quantized``; ``tokens [B, S]`` padded to the chunk, ``kept [L, B, K]``,
  ``top`` >= their max). Returns ``(cache, seconds, peak_bytes)`` as it does; ``peak_bytes``
  counts the carried store and window, the one layer dequantized to score it and, with
  ``prefill_key_bits > bits``, the keys re-packed at the end."""
  b = len(lengths)
  q_cap, w_cap = quantized_capacities(kivi, top, chunk)
  plain = lambda layers, cap: KVCache.planned_nbytes(
      num_layers=layers, batch=b, kv_heads=kv_heads, capacity=cap, head_dim=head_dim, dtype=dtype)
  store = jax.eval_shape(lambda: empty_store(kivi, num_layers=num_layers, batch=b,
                                             kv_heads=kv_heads, q_cap=q_cap, head_dim=head_dim))
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  peak = plain(num_layers, w_cap) + nbytes(store) + plain(1, q_cap + w_cap)
  if kivi.prefill_key_bits != kivi.bits:  # pack_keys: the keys at `bits` beside the store
    final = jax.eval_shape(lambda: empty_store(
        dataclasses.replace(kivi, prefill_key_bits=kivi.bits), num_layers=num_layers, batch=b,
        kv_heads=kv_heads, q_cap=q_cap, head_dim=head_dim))
    peak += nbytes((final.k_codes, final.k_scale, final.k_zero))
  check_fits(peak, f"the quantized cache (a {q_cap}-slot store and a {w_cap}-slot window x "
             f"{b} rows)", "lower the ratio, the chunk size or the batch")
  t0 = time.perf_counter()
  with explain_oom(f"prefilling {tokens.shape} tokens while compressing and quantizing",
                   "lower the ratio, the chunk size or the batch"):
    _, cache = prefill_compressing_quantized(
        params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(kept, jnp.int32),
        apply_fn=apply_fn, chunk_size=chunk, method=method, kivi=kivi, q_cap=q_cap, w_cap=w_cap,
        dtype=dtype, num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim)
    # The window keeps < residual + group tokens once the last chunk is folded in: drop the
    # chunk's free slots (the store holds exactly the budget's whole groups).
    cache = cache.resize(round_capacity(int(jnp.max(cache.lengths))))
    jax.block_until_ready(cache)
  return cache, time.perf_counter() - t0, peak
