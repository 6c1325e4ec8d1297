"""One prefill chunk through the model with a method's hook: the step that both
compress-during-prefill scans run (``lib.online`` evicts after it, ``lib.online_quantized``
also re-quantizes), in a module of its own so that neither imports the other's internals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunk_forward(params, apply_fn, method, cache, acc, xs, lengths, chunk_size: int):
  """One prefill chunk ``xs = (tokens [B, C], start)`` through the model with the method's
  hook. Returns ``(logits [B, V] of each row's last real token in the chunk, cache with the
  chunk appended, observations, acc, n_valid [B])``; for methods whose statistics are sums
  over the queries so far (``accumulate``), the observations are ``acc`` updated."""
  tok, start = xs
  n_valid = jnp.clip(lengths - start, 0, chunk_size)
  idx = jnp.clip(lengths - 1 - start, 0, chunk_size - 1)
  logits, cache, obs = apply_fn(params, tok, cache, n_valid, idx, method.observe)
  if acc is not None:
    acc = method.accumulate(acc, obs)
    obs = acc
  return logits, cache, obs, acc, n_valid


def initial_accumulator(params, apply_fn, method, cache, tokens, lengths):
  """Zeros shaped like the observations of ``tokens [B, C]`` for methods that ``accumulate``
  them over the chunks (expected attention's query moments); None for the others."""
  if not hasattr(method, "accumulate"):
    return None
  shapes = jax.eval_shape(
      lambda c: apply_fn(params, tokens, c, lengths, None, method.observe)[2], cache)
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
