"""Compress during chunked prefill: the cache never holds more than budget + one chunk.

After each prefill chunk, the method scores the cache with what that chunk observed and keeps
its budget, inside one jitted ``lax.scan`` with static shapes (capacity = largest budget + chunk).
What each method sees, relative to compress-after-prefill:

* every method: later chunks attend to the already-compressed cache (as decoding would), so
  their hidden states, and their keys above layer 0, differ from a full prefill. This is the
  approximation the mode makes for all methods; the evaluation harness measures its cost.
* ``streaming_llm`` keeps exactly the same positions; ``knorm`` keeps the same tokens wherever
  the keys are the same (layer 0, whose keys depend on the embeddings only): keeping the
  top-k chunk by chunk keeps the top-k of the whole.
* ``h2o`` / ``keyformer`` — accumulated attention is carried per slot (``cache.scores``); a
  token evicted early never receives the attention of later queries (approximation).
* ``snapkv`` / ``pyramidkv`` / ``adakv`` / ``tova`` — the observation window is the current
  chunk's last queries; only the final chunk's window is the prompt's true window.
* ``expected_attention`` — query moments are accumulated over the chunks seen so far (exact
  moments of the prefix; the averaged RoPE rotation uses the current length).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib import generate as gen
from kvlab.lib import online_quantized
from kvlab.lib.cache import KVCache, round_capacity
from kvlab.lib.memory import check_fits, explain_oom
from kvlab.lib.methods.base import select, warn
from kvlab.lib.online_chunk import chunk_forward, initial_accumulator
from kvlab.lib.paged import page_cache


def online_capacity(method, lengths: np.ndarray, chunk_size: int, num_layers: int,
                    kv_heads: int, padded: int | None = None) -> tuple[int, np.ndarray]:
  """Static capacity and the per-(layer, row, head) final budgets for prompts of ``lengths``.

  With ``padded`` (the prompt length rounded up to the chunk), the capacity is the budget of a
  ``padded``-token prompt + one chunk: it then depends on static shapes only, so prompts of
  nearby lengths share one compiled scan (at most ``ratio * chunk`` slots more than needed).
  """
  full = np.broadcast_to(np.asarray(lengths)[None, :, None], (num_layers, len(lengths), kv_heads))
  kept = method.kept(np.ascontiguousarray(full))
  for note in getattr(method, "budget_notes", lambda *_: [])(full, kept):
    warn(note)  # a window or sinks that fill the budget, as compress after prefill says
  top = int(kept.max())
  if padded is not None:
    top = max(top, int(method.kept(np.full((num_layers, 1, kv_heads), padded, np.int32)).max()))
  return round_capacity(top + chunk_size), kept


@functools.partial(jax.jit, static_argnames=("apply_fn", "chunk_size", "method", "capacity",
                                             "dtype", "num_layers", "kv_heads", "head_dim"))
def prefill_compressing(params, tokens, lengths, kept, *, apply_fn, chunk_size: int, method,
                        capacity: int, dtype=jnp.float32, num_layers: int = 0, kv_heads: int = 0,
                        head_dim: int = 0):
  """Chunked prefill that applies ``method`` after every chunk.

  Args:
    tokens: ``[B, S]`` right-padded prompt, S a multiple of ``chunk_size``; ``lengths [B]``.
    kept: ``[L, B, K]`` final budgets (``online_capacity``); fewer while the prompt is shorter.
    capacity: static slots, >= max budget + chunk.

  Returns:
    ``(last_logits [B, V], cache)``: the cache holds at most ``kept`` tokens per head.
  """
  b, s = tokens.shape
  nc = s // chunk_size
  chunks = tokens.reshape(b, nc, chunk_size).transpose(1, 0, 2)
  starts = jnp.arange(nc, dtype=jnp.int32) * chunk_size
  carried = hasattr(method, "carried_scores")
  cache = KVCache.init(num_layers=num_layers, batch=b, kv_heads=kv_heads, capacity=capacity,
                       head_dim=head_dim, dtype=dtype,
                       windows=getattr(apply_fn, "layer_windows", None))
  if carried:
    cache = cache.replace(scores=jnp.zeros(cache.positions.shape, jnp.float32))

  def step(carry, xs):
    cache, acc = carry
    logits, cache, obs, acc, n_valid = chunk_forward(params, apply_fn, method, cache, acc, xs,
                                                     lengths, chunk_size)
    stacked = None if obs is None else jax.tree.map(lambda x: x[None], obs)
    if carried:  # H2O / Keyformer: this chunk's column sums add to the carried per-slot sums
      cache = cache.replace(scores=cache.scores + obs)
      stacked = cache.scores[None]
    # Budget so far: the final budget, but never more than what has been seen. Rows whose
    # prompt already ended saw nothing new: keep all they hold (no re-selection).
    now = jnp.minimum(kept, cache.lengths)
    now = jnp.where((n_valid > 0)[None, :, None], now, cache.lengths)
    # SnapKV-style windows shrink where the budget so far does not exceed them (as after
    # prefill), so the window never fills the whole budget and evicts the attention sinks.
    scores = (method.scores(cache, stacked, kept=now)
              if getattr(method, "scores_take_kept", False) else method.scores(cache, stacked))
    cache = select(cache, scores, now, capacity)
    return (cache, acc), logits

  acc0 = initial_accumulator(params, apply_fn, method, cache, chunks[0], lengths)
  (cache, _), logits = jax.lax.scan(step, (cache, acc0), (chunks, starts))
  last_chunk = (lengths - 1) // chunk_size
  return logits[last_chunk, jnp.arange(b)], cache


def split_online(method):
  """``(eviction method, quantizers)`` of a method usable while prefilling: one eviction
  method, optionally followed by quantizers (``snapkv+kivi``). Raises ``ValueError`` naming the
  fix for anything else."""
  quantizers = ()
  if hasattr(method, "methods"):  # evict+quantize: evict chunk by chunk, quantize at the end
    evict = [m for m in method.methods if not getattr(m, "quantizes", False)]
    quantizers = tuple(m for m in method.methods if getattr(m, "quantizes", False))
    if len(evict) != 1:
      raise ValueError(
          "compress_during_prefill takes one eviction method, optionally followed by a "
          f"quantizer (snapkv+kivi); got {'+'.join(m.name for m in method.methods)}: run "
          "other compositions after prefill (drop --compress_during_prefill)")
    method = evict[0]
  if getattr(method, "reconstructs", False) or getattr(getattr(method, "inner", None),
                                                       "reconstructs", False):
    raise ValueError(
        f"{method.name} scores the whole context by having the model repeat it, so it cannot "
        "compress while prefilling: drop --compress_during_prefill for it")
  if not hasattr(method, "scores"):
    raise ValueError(
        f"compress_during_prefill needs an eviction method, got {type(method).__name__} "
        "(quantize-only methods keep every token: compose them after one, e.g. snapkv+kivi)")
  return method, quantizers


def prefill_context_compressing(params, apply_fn, context, method, *, num_layers: int,
                                kv_heads: int, head_dim: int, dtype=jnp.float32,
                                chunk_size: int = 512, quantize_each_chunk: bool = False):
  """Host wrapper of ``prefill_compressing`` for token lists (right-padded to the chunk).

  Args:
    context: ``B`` token lists (any lengths).
    method: one eviction method, or ``eviction+quantizer`` (``snapkv+kivi``): the eviction runs
      after every chunk and the kept cache is quantized once at the end, so the float cache
      peaks at budget + one chunk and the result is packed.
    quantize_each_chunk: with ``eviction+kivi``, quantize what is kept after every chunk
      (``lib.online_quantized``): the scan then carries the budget packed plus a float window
      of ``residual + group + chunk`` slots, and dequantizes one layer at a time to score it.

  Returns:
    ``(cache, seconds, peak_bytes)``: the cache holds at most each head's budget; ``seconds``
    is wall-clock of the jitted scan (compilation included on first use of a shape);
    ``peak_bytes`` the bytes of the cache the scan carried (``S = round8(max budget + chunk)``
    slots, the most it ever allocated). After the scan, a quantizer packs what is kept and a
    method with ragged budgets (AdaKV, PyramidKV) stores it paged (``lib.paged``), so
    ``cache.nbytes`` is then below ``peak_bytes``.
  """
  method, quantizers = split_online(method)
  if quantize_each_chunk:
    online_quantized.check_quantizable_each_chunk(method, quantizers)
  chunk = min(chunk_size, gen.round_up(max(len(c) for c in context), 8))
  tokens, lengths = gen.pad_batch(context, chunk)
  cap, kept = online_capacity(method, lengths, chunk, num_layers, kv_heads,
                              padded=tokens.shape[1])
  if quantize_each_chunk:
    return online_quantized.prefill_quantizing(params, apply_fn, tokens, lengths, kept,
                                               cap - chunk, method, quantizers[0], chunk, dtype,
                                               num_layers, kv_heads, head_dim)
  need = KVCache.planned_nbytes(num_layers=num_layers, batch=len(context), kv_heads=kv_heads,
                                capacity=cap, head_dim=head_dim, dtype=dtype)
  check_fits(need, f"the compressed cache (budget + one chunk = {cap} slots x {len(context)} "
             "rows)", "lower the ratio, the chunk size or the batch")
  t0 = time.perf_counter()
  with explain_oom(f"prefilling {tokens.shape} tokens while compressing",
                   "lower the ratio, the chunk size or the batch"):
    _, cache = prefill_compressing(
        params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(kept, jnp.int32),
        apply_fn=apply_fn, chunk_size=chunk, method=method, capacity=cap, dtype=dtype,
        num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim)
    peak = cache.nbytes
    for q in quantizers:  # what is kept at the end, quantized (peak: budget + chunk, float)
      cache = q.apply(cache, extra=0)
    if not quantizers and getattr(method, "layout", None) == "paged":
      cache = page_cache(cache.resize(round_capacity(int(jnp.max(cache.lengths)))),
                         page=method.page, room=8)
    jax.block_until_ready(cache)
  return cache, time.perf_counter() - t0, peak

