"""Compress-then-ask: the query-agnostic protocol on the three pure functions.

The context is prefilled (with the method's observe hook) and compressed before the question is
seen; the question is then prefilled onto the compressed cache and the answer decoded from it.
With ``method=None`` the same path runs on the full cache (the reference).
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp

from lib import generate as gen
from lib.cache import KVCache, round_capacity
from lib.methods import compress


def compress_then_ask(params, apply_fn, context: Sequence[Sequence[int]],
                      question: Sequence[Sequence[int]], *, method=None,
                      max_new_tokens: int = 32, stop_tokens: tuple[int, ...] = (),
                      num_layers: int, kv_heads: int, head_dim: int, dtype=jnp.float32,
                      chunk_size: int = 512, block: int = 512, max_context: int | None = None):
  """Returns a dict: ``tokens`` (answers), ``cache_bytes`` (after compression, from the leaves),
  ``full_bytes`` (the uncompressed context cache), and seconds for prefill/compress/decode."""
  q_len = max(len(q) for q in question)
  c_chunk = min(chunk_size, gen.round_up(max(len(c) for c in context), 8))
  ctx, ctx_len = gen.pad_batch(context, c_chunk)
  gen.check_context(ctx_len + q_len, max_new_tokens, max_context)
  cache = KVCache.init(num_layers=num_layers, batch=len(context), kv_heads=kv_heads,
                       capacity=round_capacity(ctx.shape[1], block), head_dim=head_dim,
                       dtype=dtype)
  full_bytes = cache.nbytes
  observe = None if method is None else method.observe
  t0 = time.perf_counter()
  _, cache, obs = gen.prefill(params, jnp.asarray(ctx), jnp.asarray(ctx_len), cache,
                              apply_fn=apply_fn, chunk_size=c_chunk, observe=observe)
  jax.block_until_ready(cache)
  t1 = time.perf_counter()
  q_chunk = gen.round_up(q_len, 8)
  room = q_chunk + max_new_tokens
  if method is not None:
    cache = compress(method, cache, obs, extra=room, block=block)
  else:
    cache = cache.resize(round_capacity(int(jnp.max(cache.lengths)) + room, block))
  jax.block_until_ready(cache)
  t2 = time.perf_counter()
  kept_bytes = cache.resize(round_capacity(int(jnp.max(cache.lengths)), block)).nbytes
  qs, q_lens = gen.pad_batch(question, q_chunk)
  logits, cache, _ = gen.prefill(params, jnp.asarray(qs), jnp.asarray(q_lens), cache,
                                 apply_fn=apply_fn, chunk_size=q_chunk)
  out, n_gen, cache = gen.decode_loop(params, cache, logits, jax.random.PRNGKey(0),
                                      apply_fn=apply_fn, max_new_tokens=max_new_tokens,
                                      stop_tokens=stop_tokens)
  out = jax.device_get(out)
  t3 = time.perf_counter()
  n_gen = jax.device_get(n_gen)
  return {"tokens": [out[i, : n_gen[i]].tolist() for i in range(len(context))],
          "cache_bytes": kept_bytes, "full_bytes": full_bytes,
          "prefill_s": t1 - t0, "compress_s": t2 - t1, "answer_s": t3 - t2}
