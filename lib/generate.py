"""The pure generation functions: ``prefill``, ``decode_step`` and a jitted decode loop.

``lib`` never imports ``models``: every function takes the model's ``apply_fn`` with signature

  apply_fn(params, tokens [B, T], cache, n_valid [B], logit_index [B] | None, observe)
      -> (logits, cache, observations)

where ``logits`` is ``[B, V]`` at ``logit_index`` (or ``[B, T, V]`` when it is None), the cache
has the T tokens appended (``n_valid`` of them counted per row) and ``observations`` is what the
``observe`` hook returned per layer (stacked on a leading layer axis; ``None`` without a hook).

Batches of prompts with different lengths are right-padded; every row keeps its own length
and positions in the cache, so no left-padding position shifts are needed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib.cache import KVCache
from kvlab.lib.quant.store import flush as quant_flush
from kvlab.lib.sampling import SamplingConfig, sample

ApplyFn = Callable[..., tuple[jax.Array, KVCache, Any]]


def round_up(x: int, m: int) -> int:
  """The smallest multiple of ``m`` that is >= ``x``."""
  return -(-x // m) * m


def pad_batch(prompts: Sequence[Sequence[int]], chunk_size: int, pad_id: int = 0):
  """Right-pads token lists to a common multiple of ``chunk_size``.

  Returns ``(tokens [B, S] int32, lengths [B] int32)`` as numpy arrays.
  """
  if not prompts:
    raise ValueError("no prompts given: pass at least one prompt")
  lengths = np.array([len(p) for p in prompts], np.int32)
  if (lengths == 0).any():
    bad = [i for i, n in enumerate(lengths) if n == 0]
    raise ValueError(f"prompt(s) {bad} are empty after tokenization: give at least one token "
                     "(for a chat model, apply the chat template)")
  s = round_up(int(lengths.max()), chunk_size)
  tokens = np.full((len(prompts), s), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  return tokens, lengths


def check_context(lengths, max_new_tokens: int, max_context: int | None):
  """Raises a clear error when prompt + generation would pass the model's context limit."""
  longest = int(np.max(lengths))
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if max_context is not None and max_new_tokens >= max_context:
    raise ValueError(f"max_new_tokens={max_new_tokens} is not below the model's context limit "
                     f"of {max_context} tokens, which the prompt shares: lower max_new_tokens")
  if max_context is not None and longest + max_new_tokens > max_context:
    raise ValueError(
        f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context "
        f"limit of {max_context} tokens: shorten the prompt to at most "
        f"{max_context - max_new_tokens} tokens or lower max_new_tokens")


def check_capacity(cache: KVCache, padded_len: int, max_new_tokens: int):
  """Raises if appending a padded prompt and ``max_new_tokens`` could overflow the cache."""
  need = int(jnp.max(cache.lengths)) + max(padded_len, 1) + max_new_tokens
  if need > cache.capacity:
    raise ValueError(f"cache capacity {cache.capacity} is too small: this call needs {need} "
                     "slots (existing + padded prompt + new tokens); allocate a larger cache")


def _room_error(cache: KVCache, need: int, what: str, fix: str) -> None:
  """Raises when ``cache`` has fewer than ``need`` free slots (``KVCache.free_slots``): a
  write past the capacity would silently overwrite the last slots."""
  free = cache.free_slots()
  if free is not None and need > free:
    raise ValueError(f"the cache has {max(free, 0)} free slots (capacity {cache.capacity}) but "
                     f"{what} needs {need}: {fix}")


def prefill(params, tokens: jax.Array, lengths: jax.Array, cache: KVCache, *,
            apply_fn: ApplyFn, chunk_size: int = 512, observe=None):
  """Runs the prompt through the model chunk by chunk, appending to ``cache`` (see
  ``_prefill``); raises first if the padded prompt does not fit the cache's free slots."""
  windows = getattr(apply_fn, "layer_windows", None)
  if windows is not None and cache.windows is None:  # a cache made without the model (lib code)
    cache = cache.replace(windows=windows)
  _room_error(cache, int(tokens.shape[1]), f"a padded prompt of {tokens.shape[1]} tokens",
              "allocate the cache with room for it (lm.new_cache(batch, capacity)), or compress "
              "with room=... slots for what is appended later")
  return _prefill(params, tokens, lengths, cache, apply_fn=apply_fn, chunk_size=chunk_size,
                  observe=observe)


@functools.partial(jax.jit, static_argnames=("apply_fn", "chunk_size", "observe"),
                   donate_argnames=("cache",))
def _prefill(params, tokens: jax.Array, lengths: jax.Array, cache: KVCache, *,
             apply_fn: ApplyFn, chunk_size: int = 512, observe=None):
  """Runs the prompt through the model chunk by chunk, appending to ``cache``.

  Args:
    params: model parameters (a pytree, never mutated).
    tokens: ``[B, S]`` int32 right-padded prompt, ``S`` a multiple of ``chunk_size``.
    lengths: ``[B]`` int32 real prompt lengths (>= 1).
    cache: the cache to extend (empty, or already holding a compressed context).
    apply_fn: the model's forward function (see module docstring).
    chunk_size: tokens per forward call; attention memory is O(chunk * block).
    observe: optional per-layer observation hook (a static, hashable callable).

  Returns:
    ``(last_logits [B, V], cache, observations)``; ``observations`` are stacked
    ``[num_chunks, L, ...]`` (``None`` without a hook).
  """
  b, s = tokens.shape
  if s % chunk_size:
    raise ValueError(f"padded prompt length {s} must be a multiple of chunk_size {chunk_size}")
  nc = s // chunk_size
  chunks = tokens.reshape(b, nc, chunk_size).transpose(1, 0, 2)  # [nc, B, C]
  starts = jnp.arange(nc, dtype=jnp.int32) * chunk_size

  def step(cache, xs):
    tok, start = xs
    n_valid = jnp.clip(lengths - start, 0, chunk_size)
    idx = jnp.clip(lengths - 1 - start, 0, chunk_size - 1)
    logits, cache, obs = apply_fn(params, tok, cache, n_valid, idx, observe)
    return cache, (logits, obs)

  cache, (logits, obs) = jax.lax.scan(step, cache, (chunks, starts))  # logits [nc, B, V]
  last_chunk = (lengths - 1) // chunk_size
  last_logits = logits[last_chunk, jnp.arange(b)]
  return last_logits, cache, obs


def _decode_step(params, token: jax.Array, cache: KVCache, *, apply_fn: ApplyFn, method=None,
                 active: jax.Array | None = None):
  """One decode step: appends ``token [B]`` to the cache and returns ``(logits [B, V], cache)``.

  ``method`` (a hashable method with ``update(cache, observations) -> cache``, observing with
  ``decode_observe`` or ``observe``) runs after the append for decode-time eviction; it keeps
  one slot free, so the cache capacity is the budget. ``active [B]`` bool freezes finished rows (their token
  is not counted into the cache). A quantized cache (``cache.quant``) flushes its oldest
  full-precision group into packed codes once its window is full (``lib.quant.store.flush``).
  """
  n_new = jnp.ones(token.shape, jnp.int32) if active is None else active.astype(jnp.int32)
  observe = None
  if method is not None and hasattr(method, "update"):
    observe = getattr(method, "decode_observe", None) or method.observe
  logits, cache, obs = apply_fn(params, token[:, None], cache, n_new,
                                jnp.zeros(token.shape, jnp.int32), observe)
  if method is not None and hasattr(method, "update"):
    cache = method.update(cache, obs)
  if cache.quant is not None and hasattr(cache.quant, "insert"):  # quantized: stream the
    cache = quant_flush(cache)  # oldest full-precision tokens in (a low-rank store takes none)
  return logits, cache


_decode_step_jit = jax.jit(_decode_step, static_argnames=("apply_fn", "method"),
                           donate_argnames=("cache",))


def _evicts(method) -> bool:
  return method is not None and hasattr(method, "update")


def decode_step(params, token: jax.Array, cache: KVCache, *, apply_fn: ApplyFn, method=None,
                active: jax.Array | None = None):
  """One jitted decode step (``_decode_step``); raises first if the cache is full and no
  decode-time eviction frees a slot."""
  if not _evicts(method):
    _room_error(cache, 1, "a decode step", "compress with room for the answer "
                "(kvlab.compress(..., room=max_new_tokens + question)) or allocate more")
  return _decode_step_jit(params, token, cache, apply_fn=apply_fn, method=method,
                          active=active)


def decode_loop(params, cache: KVCache, first_logits: jax.Array, rng: jax.Array, *,
                apply_fn: ApplyFn, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                stop_tokens: tuple[int, ...] = (), method=None, pad_id: int = 0):
  """The jitted decode loop (``_decode_loop``: returns ``(tokens [B, max_new_tokens],
  num_generated [B], cache)``); raises first if ``max_new_tokens`` do not fit the cache's free
  slots (the last token is returned, not appended: ``max_new_tokens - 1`` slots; a method with
  decode-time eviction needs one free slot)."""
  need = min(1, max_new_tokens - 1) if _evicts(method) else max_new_tokens - 1
  _room_error(cache, need, f"decoding {max_new_tokens} tokens",
              "compress with room for them (kvlab.compress(..., room=...), "
              "lib.methods.compress(..., extra=...)), or lower max_new_tokens")
  return _decode_loop(params, cache, first_logits, rng, apply_fn=apply_fn,
                      max_new_tokens=max_new_tokens, sampling=sampling,
                      stop_tokens=stop_tokens, method=method, pad_id=pad_id)


@functools.partial(
    jax.jit,
    static_argnames=("apply_fn", "max_new_tokens", "sampling", "stop_tokens", "method",
                     "pad_id"),
    donate_argnames=("cache",))
def _decode_loop(params, cache: KVCache, first_logits: jax.Array, rng: jax.Array, *,
                apply_fn: ApplyFn, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                stop_tokens: tuple[int, ...] = (), method=None, pad_id: int = 0):
  """Generates up to ``max_new_tokens`` per row inside one ``lax.while_loop``.

  Args:
    first_logits: ``[B, V]`` logits after the prompt (from ``prefill``).
    rng: PRNG key (unused when greedy).
    stop_tokens: token ids that end a row; the stop token itself is emitted and counted.

  Returns:
    ``(tokens [B, max_new_tokens] int32 padded with pad_id, num_generated [B], cache)``.
    The loop exits early once every row has stopped.
  """
  b = first_logits.shape[0]
  stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

  def emit(i, logits, rng, out, done, n_gen):
    rng, sub = jax.random.split(rng)
    tok = jnp.where(done, pad_id, sample(logits, sub, sampling))
    out = out.at[:, i].set(tok)
    n_gen = n_gen + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok, stops)
    return rng, out, done, n_gen, tok

  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  done = jnp.zeros((b,), bool)
  n_gen = jnp.zeros((b,), jnp.int32)
  rng, out, done, n_gen, tok = emit(0, first_logits, rng, out, done, n_gen)

  def cond(c):
    i, _, done, *_ = c
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(c):
    i, tok, done, n_gen, out, cache, rng = c
    logits, cache = _decode_step(params, tok, cache, apply_fn=apply_fn, method=method,
                                 active=~done)
    rng, out, done, n_gen, tok = emit(i, logits, rng, out, done, n_gen)
    return i + 1, tok, done, n_gen, out, cache, rng

  c = (jnp.int32(1), tok, done, n_gen, out, cache, rng)
  _, _, _, n_gen, out, cache, _ = jax.lax.while_loop(cond, body, c)
  return out, n_gen, cache
