"""Compress-then-ask on the three pure functions.

``prefill_context`` runs the context once (with every method's observe hook); ``ask`` takes a
(compressed or full) cache, prefills the question and decodes the answer; ``teacher_force``
scores a given continuation. The query-agnostic protocol compresses before the question is seen;
query-aware puts the question inside the compressed context and asks only the generation prompt.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp

from kvlab.lib import generate as gen
from kvlab.lib.cache import KVCache, round_capacity
from kvlab.lib.memory import check_fits, explain_oom
from kvlab.lib.methods import compress
from kvlab.lib.methods.kvzip import max_attention


def prefill_context(params, apply_fn, context: Sequence[Sequence[int]], *, num_layers: int,
                    kv_heads: int, head_dim: int, dtype=jnp.float32, observe=None,
                    chunk_size: int = 512, block: int = 512):
  """Returns ``(cache, observations, seconds)`` for the (right-padded) contexts."""
  chunk = min(chunk_size, gen.round_up(max(len(c) for c in context), 8))
  ctx, ctx_len = gen.pad_batch(context, chunk)
  kw = dict(num_layers=num_layers, batch=len(context), kv_heads=kv_heads,
            capacity=round_capacity(ctx.shape[1], block), head_dim=head_dim, dtype=dtype)
  check_fits(KVCache.planned_nbytes(**kw), f"the full KV cache of {ctx.shape} context tokens",
             "compress while prefilling (lib.online / --compress_during_prefill), or lower "
             "the batch or the context length")
  cache = KVCache.init(**kw)
  t0 = time.perf_counter()
  with explain_oom(f"prefilling {ctx.shape} context tokens",
                   "compress while prefilling (--compress_during_prefill), or lower the batch "
                   "or the context length"):
    _, cache, obs = gen.prefill(params, jnp.asarray(ctx), jnp.asarray(ctx_len), cache,
                                apply_fn=apply_fn, chunk_size=chunk, observe=observe)
    jax.block_until_ready(cache)
  return cache, obs, time.perf_counter() - t0


def compress_for(method, cache: KVCache, obs, room: int, block: int = 512):
  """Compressed copy of ``cache`` with ``room`` free slots (``method=None``: the full cache).

  Returns ``(cache, kept_bytes, seconds)``; ``kept_bytes`` is the cache without the free room,
  from its leaves.
  """
  t0 = time.perf_counter()
  if method is None:
    out = cache.resize(round_capacity(int(jnp.max(cache.lengths)) + room, block))
  else:
    out = compress(method, cache, obs, extra=room, block=block)
  jax.block_until_ready(out)
  dt = time.perf_counter() - t0
  kept = out.trimmed().nbytes
  return out, kept, dt


def reconstruction_scores(params, apply_fn, cache: KVCache, context: Sequence[int],
                          prompts: tuple[Sequence[int], Sequence[int], Sequence[int]], *,
                          chunk: int, prefix: int = 0, max_context: int | None = None,
                          chunk_size: int = 512, block: int = 512, progress=None):
  """KVzip's observations (``lib.methods.kvzip``): the model repeats ``context`` (the tokens the
  one-row ``cache`` holds) ``chunk`` tokens at a time after the cache; each slot's score is the
  largest attention it gets from a repeat's queries.

  Args:
    prompts: token ids ``(first, later, suffix)``: the instruction before the first chunk, the
      one before each later chunk (followed by the previous chunk's last 8 tokens), and what
      closes the instruction (the chat template's end of turn and assistant header).
    prefix: context tokens before the content (the chat template's system part): they are not
      repeated, and ``KVzip`` always keeps them.
    max_context: the model's position limit: ``context + prompt + chunk`` must fit in it.

  Returns:
    ``{"scores": [L, 1, K, S] float32, "prefix": [1] int32}``; ``cache`` is left as it was
    (each repeat runs on a copy).
  """
  first, later, suffix = (list(p) for p in prompts)
  n = len(context)
  if cache.batch != 1:
    raise ValueError(f"kvzip reconstructs one context at a time, got a cache of {cache.batch} "
                     "rows: compress each row's cache on its own")
  if int(jnp.max(cache.lengths)) != n:
    raise ValueError(f"kvzip: the cache holds {int(jnp.max(cache.lengths))} tokens but the "
                     f"context has {n}: pass the token ids the cache was prefilled with")
  content = list(context[prefix:])
  pieces = [content[a:a + chunk] for a in range(0, len(content), chunk)] or [[]]
  runs = []
  for i, piece in enumerate(pieces):
    lead = first if i == 0 else later + pieces[i - 1][-8:]
    runs.append(lead + suffix + piece)
  longest = max(len(r) for r in runs)
  if max_context is not None and n + longest > max_context:
    raise ValueError(f"kvzip: the context ({n} tokens) + a repeat of up to {longest} tokens "
                     f"passes the model's limit of {max_context} positions: lower the chunk "
                     f"(--method=kvzip:chunk={max(1, (max_context - n) // 2)}) or the context")
  # Prefill chunks of at most ``chunk_size``, sized so the longest run pads the least.
  t_chunk = gen.round_up(-(-longest // -(-longest // chunk_size)), 8)
  big = cache.resize(round_capacity(n + gen.round_up(longest, t_chunk), block))
  best = None
  for run in (runs if progress is None else progress(runs)):
    toks, lens = gen.pad_batch([run], t_chunk)
    copy = jax.tree_util.tree_map(jnp.copy, big)
    _, _, obs = gen.prefill(params, jnp.asarray(toks), jnp.asarray(lens), copy,
                            apply_fn=apply_fn, chunk_size=t_chunk, observe=max_attention())
    m = obs.max(0)[..., :cache.capacity]  # [L, 1, K, S]: over the repeat's chunks
    best = m if best is None else jnp.maximum(best, m)
  return {"scores": best, "prefix": jnp.full((1,), prefix, jnp.int32)}


def ask(params, apply_fn, cache: KVCache, question: Sequence[Sequence[int]], *,
        max_new_tokens: int, stop_tokens: tuple[int, ...] = (), method=None):
  """Prefills ``question`` onto ``cache`` (consumed) and decodes greedily; a ``method`` with
  ``update`` evicts during decoding (then the cache needs room for the question + 1 only).

  Returns ``(answers as token lists, seconds)``."""
  t0 = time.perf_counter()
  q_chunk = gen.round_up(max(len(q) for q in question), 8)
  evicting = method is not None and hasattr(method, "update")
  gen.check_capacity(cache, q_chunk, 1 if evicting else max_new_tokens)
  qs, q_lens = gen.pad_batch(question, q_chunk)
  logits, cache, _ = gen.prefill(params, jnp.asarray(qs), jnp.asarray(q_lens), cache,
                                 apply_fn=apply_fn, chunk_size=q_chunk)
  out, n_gen, _ = gen.decode_loop(params, cache, logits, jax.random.PRNGKey(0),
                                  apply_fn=apply_fn, max_new_tokens=max_new_tokens,
                                  stop_tokens=stop_tokens, method=method if evicting else None)
  out, n_gen = jax.device_get((out, n_gen))
  return [out[i, : n_gen[i]].tolist() for i in range(len(question))], time.perf_counter() - t0


def teacher_force(params, apply_fn, cache: KVCache, tokens: Sequence[int]) -> jax.Array:
  """Logits ``[T, V]`` after each of ``tokens`` (one row) appended to ``cache`` (consumed)."""
  t = len(tokens)
  logits, _, _ = apply_fn(params, jnp.asarray([tokens], jnp.int32), cache,
                          jnp.asarray([t], jnp.int32), None, None)
  return logits[0]


def compress_then_ask(params, apply_fn, context, question, *, method=None,
                      max_new_tokens: int = 32, stop_tokens: tuple[int, ...] = (),
                      num_layers: int, kv_heads: int, head_dim: int, dtype=jnp.float32,
                      chunk_size: int = 512, block: int = 512, max_context: int | None = None):
  """Query-agnostic in one call. Returns ``tokens``, ``cache_bytes`` (kept), ``full_bytes``
  and seconds for prefill/compress/answer."""
  q_len = max(len(q) for q in question)
  gen.check_context([max(len(c) for c in context) + q_len], max_new_tokens, max_context)
  cache, obs, t_pre = prefill_context(
      params, apply_fn, context, num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim,
      dtype=dtype, observe=None if method is None else method.observe, chunk_size=chunk_size,
      block=block)
  full_bytes = cache.nbytes
  room = gen.round_up(q_len, 8) + max_new_tokens
  small, kept, t_c = compress_for(method, cache, obs, room, block)
  answers, t_a = ask(params, apply_fn, small, question, max_new_tokens=max_new_tokens,
                     stop_tokens=stop_tokens)
  return {"tokens": answers, "cache_bytes": kept, "full_bytes": full_bytes, "prefill_s": t_pre,
          "compress_s": t_c, "answer_s": t_a}
