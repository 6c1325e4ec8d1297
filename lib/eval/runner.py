"""Runs one sample against the full cache and every (method, ratio), sharing one prefill.

Rows (one per sample x method x ratio) carry the score, fidelity to the full cache (KL, top-1,
answer log-likelihoods on the full cache's answer), bytes from the leaves and timings.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib import generate as gen
from kvlab.lib import methods as methods_lib
from kvlab.lib.eval.batching import plain_rows, stack_rows
from kvlab.lib.eval.metrics import fidelity, string_match_all
from kvlab.lib.cache import round_capacity
from kvlab.lib.eval.tasks import Sample
from kvlab.lib.online import prefill_context_compressing
from kvlab.lib.methods.kvzip import reconstructor
from kvlab.lib.protocol import ask, compress_for, prefill_context, reconstruction_scores

PROTOCOLS = ("query_agnostic", "query_aware", "shared_context")
_SPLIT = "\u2063KVLAB_SPLIT\u2063"


def prompt_pieces(tokenizer, sample: Sample, protocol: str) -> tuple[list[int], list[int]]:
  """Token ids ``(compressed part, asked part)`` of the chat-templated prompt.

  query_agnostic: compressed = the context; asked = question + generation prompt.
  query_aware: compressed = context + question; asked = the generation prompt only.
  shared_context: as query_agnostic (the run then asks every question of the sample).
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
  if tokenizer.chat_template:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": sample.context + "\n\n" + _SPLIT + sample.question}])
  else:
    text = sample.context + "\n\n" + _SPLIT + "Question: " + sample.question + "\nAnswer:"
  pre, post = text.split(_SPLIT)
  if protocol == "query_aware":
    cut = post.index(sample.question) + len(sample.question)
    pre, post = pre + post[:cut], post[cut:]
  return (tokenizer.encode(pre, add_special_tokens=True),
          tokenizer.encode(post, add_special_tokens=False))


def reconstruction_prompts(tokenizer, context: Sequence[int]):
  """KVzip's repeat instructions for this tokenizer: ``((first, later, suffix), prefix)``.

  ``suffix`` closes the user turn and opens the assistant's (the chat template's), so the
  model repeats as its answer; ``prefix`` is how many leading ``context`` tokens are the
  template's own (system prompt and user header), 0 without a template."""
  first = tokenizer.encode("\n\nRepeat the previous context exactly.", add_special_tokens=False)
  later = tokenizer.encode("\n\nRepeat the part of the previous context exactly, starting with",
                           add_special_tokens=False)
  if not tokenizer.chat_template:
    return (first, later, tokenizer.encode("\n", add_special_tokens=False)), 0
  text = tokenizer.apply_chat_template([{"role": "user", "content": "x" + _SPLIT}])
  suffix = tokenizer.encode(text.split(_SPLIT)[1], add_special_tokens=False)
  head = tokenizer.apply_chat_template([{"role": "user", "content": _SPLIT}]).split(_SPLIT)[0]
  pre = tokenizer.encode(head, add_special_tokens=True)
  prefix = len(pre) if list(context[:len(pre)]) == pre else 0
  return (first, later, suffix), prefix


def method_observations(lm, method, cache, ctx, obs_joint=None, hooks=(), chunk_size=512,
                        memo=None):
  """What ``compress`` needs for ``method`` on ``cache`` (``[L, 1, K, S]``, prefilled with the
  token ids ``ctx``): its prefill hook's share of ``obs_joint`` (``hooks`` lists the hooks that
  prefill ran, in order), and for KVzip (alone, as AdaKV's scorer, or first in a composition)
  the repeat passes' scores, formed once per sample and chunk size (``memo``) however many
  cells use them.

  Returns ``(observations, seconds of the repeat passes)`` (0 for other methods); every cell
  that uses the repeats is charged their seconds, as it would be alone."""
  obs = None
  if method.observe is not None:
    obs = obs_joint[hooks.index(method.observe)]
  rec = reconstructor(method)
  if rec is None:
    return obs, 0.0
  memo = {} if memo is None else memo
  if rec.chunk not in memo:
    prompts, prefix = reconstruction_prompts(lm.tokenizer, ctx)
    t0 = time.perf_counter()
    out = reconstruction_scores(
        lm.params, lm.apply_fn, cache, ctx, prompts, chunk=rec.chunk, prefix=prefix,
        max_context=lm.config.max_position_embeddings, chunk_size=chunk_size,
        block=lm.attn_block_size)
    jax.block_until_ready(out)
    memo[rec.chunk] = (out, time.perf_counter() - t0)
  scores, seconds = memo[rec.chunk]
  members = getattr(method, "methods", None)
  if members is None:
    return scores, seconds
  return tuple(scores if reconstructor(m) is not None else (None if obs is None else obs[i])
               for i, m in enumerate(members)), seconds


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _teacher_force(params, cache, tokens, n, *, apply_fn):
  logits, _, _ = apply_fn(params, tokens, cache, n, None, None)
  return logits


def _force_rows(lm, cache, tokens):
  """Logits ``[B, T, V]`` after ``tokens`` (the same for every row) appended to ``cache``."""
  t, b = len(tokens), cache.batch
  padded = tokens + [0] * (gen.round_up(t, 16) - t)
  return _teacher_force(lm.params, cache, jnp.asarray([padded] * b, jnp.int32),
                        jnp.full((b,), t, jnp.int32), apply_fn=lm.apply_fn)[:, :t]


def _force(lm, cache, tokens):
  return _force_rows(lm, cache, tokens)[0]


# Caches handed to the jitted ask/teacher-force functions are padded to a multiple of this many
# slots, so samples of slightly different lengths reuse one compiled program instead of
# compiling one per capacity (bytes are reported before this padding).
_BUCKET = 128


def _bucket(cache):
  return cache.resize(gen.round_up(cache.capacity, _BUCKET))


def _copy(cache):
  return jax.tree.map(jnp.copy, cache)


def prefill_modes(during_prefill: bool, quantize_each_chunk: bool = False) -> tuple[str, ...]:
  """The ``prefill_mode`` of each row a cell gets: ``after`` (compress after prefill),
  ``during`` (after every chunk, quantized at the end) and ``during_quantized`` (evicted and
  quantized after every chunk, ``lib.online_quantized``)."""
  if quantize_each_chunk and not during_prefill:
    raise ValueError("quantize_each_chunk is a mode of compress_during_prefill: set both")
  return ("after",) + (("during",) if during_prefill else ()) + (
      ("during_quantized",) if quantize_each_chunk else ())


def run_sample(lm, sample: Sample, cells: Sequence[tuple[str, float, Any]], *, protocol: str,
               max_new_tokens: int, chunk_size: int = 512,
               during_prefill: bool = False, batch_cells: int = 8,
               quantize_each_chunk: bool = False, progress=None) -> list[dict]:
  """Evaluates ``cells`` = [(method spec, ratio, Method)] on one sample.

  ``lm`` is a ``models.LanguageModel``-like object (params, apply_fn, tokenizer, config,
  attn_block_size, stop_tokens). The context is prefilled once; each cell compresses it once.
  Returns one row per cell plus the full-cache row. With ``shared_context`` every question of
  the sample is asked of the same compressed cache and a row's metrics are means over the
  questions (``n_questions``).

  Cells whose compressed caches are plain keys/values are answered together, up to
  ``batch_cells`` rows per batch (``lib.eval.batching``; 1 answers every cell alone). Their
  rows carry ``answer_batch`` (rows in the batch) and ``answer_s`` = the batch's seconds
  divided by it.

  ``progress`` (a ``tqdm`` bar, or anything with ``reset(total)``, ``update(n)`` and
  ``set_postfix_str(s, refresh)``) counts the sample's steps: the prefill, the full-cache
  answers, then each cell's compression and each cell's answers (``2 + 2 * cells * modes``).
  """
  if batch_cells < 1:
    raise ValueError(f"batch_cells must be >= 1, got {batch_cells}")
  c = lm.config
  block = lm.attn_block_size
  queries = [(sample.question, sample.answers)]
  if protocol == "shared_context":
    queries += list(sample.more_queries)
  split = "query_aware" if protocol == "query_aware" else "query_agnostic"
  ctx, _ = prompt_pieces(lm.tokenizer, sample, split)
  qs = [prompt_pieces(lm.tokenizer, dataclasses.replace(sample, question=qq), split)[1]
        for qq, _ in queries]
  longest = max(len(q) for q in qs)
  gen.check_context([len(ctx) + longest], max_new_tokens, c.max_position_embeddings)
  modes = prefill_modes(during_prefill, quantize_each_chunk)
  step = _stepper(progress, 2 + 2 * len(cells) * len(modes))
  step(0, "prefill")
  hooks = tuple(dict.fromkeys(m.observe for _, _, m in cells if m.observe is not None))
  observe = methods_lib._joint_observe(hooks) if hooks else None  # pylint: disable=protected-access
  cache, obs_all, t_pre = prefill_context(
      lm.params, lm.apply_fn, [ctx], num_layers=c.num_layers, kv_heads=c.num_kv_heads,
      head_dim=c.head_dim, dtype=lm.dtype, observe=observe, chunk_size=chunk_size, block=block)
  room = gen.round_up(longest, 8) + max_new_tokens + 16
  step(1, "full cache")
  base = {"task": sample.task, "sample": sample.seed, "depth": sample.depth,
          "protocol": protocol, "context_tokens": len(ctx), "prefill_s": t_pre,
          "n_questions": len(queries)}

  # Full cache: the reference answers and distributions for every question.
  full, full_bytes, _ = compress_for(None, cache, None, room, block)
  full = _bucket(full)
  refs, full_metrics = [], []
  for q, (_, answers) in zip(qs, queries):
    ans, t_ans = ask(lm.params, lm.apply_fn, _copy(full), [q], max_new_tokens=max_new_tokens,
                     stop_tokens=lm.stop_tokens)
    cont = q + ans[0]
    ref_logits = _force(lm, full, cont)[len(q) - 1: -1]
    targets = jnp.asarray(ans[0], jnp.int32)
    refs.append((cont, ref_logits, targets))
    pred = lm.tokenizer.decode(ans[0])
    full_metrics.append({"score": string_match_all(pred, answers), "prediction": pred,
                         "kl": 0.0, "top1": 1.0, **_ll(ref_logits, targets), "answer_s": t_ans})
  rows = [{**base, "method": "full", "ratio": 1.0, **_mean(full_metrics),
           "cache_bytes": full_bytes, "full_bytes": full_bytes, "compress_s": 0.0,
           **size_fields("full", None, full_bytes, full_bytes, len(ctx)),
           "prefill_mode": "after", "peak_cache_bytes": full_bytes, "answer_batch": 1}]
  pending = []  # (index in rows, row without answers, plain cache) answered in batches
  step(1, "compress")

  memo = {}
  for spec, ratio, method in cells:
    obs, t_rec = method_observations(lm, method, cache, ctx, obs_all, hooks, chunk_size, memo)
    # Decode-time methods (H2O, TOVA) keep a fixed-size cache: room for the question and one
    # free slot; they evict one token per decoded token. Their KL/top-1 are teacher-forced on
    # the prefill-compressed cache (no decode-time eviction inside that single forward).
    evicting = hasattr(method, "update")
    m_room = gen.round_up(longest, 8) + 1 if evicting else room
    for mode in modes:
      if mode == "after":
        small, kept, t_c = compress_for(method, cache, obs, m_room, block)
        t_c += t_rec  # KVzip's repeat passes (0 for the others)
        t_p, peak = t_pre, full_bytes
      else:  # a fresh chunked prefill that compresses (and quantizes) after every chunk
        online, t_p, peak = prefill_context_compressing(
            lm.params, lm.apply_fn, [ctx], method, num_layers=c.num_layers,
            kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=lm.dtype, chunk_size=chunk_size,
            quantize_each_chunk=mode == "during_quantized")
        n_max = int(jnp.max(online.lengths))
        t_c = 0.0
        kept = online.trimmed().nbytes
        small = online.resize(round_capacity(n_max + m_room))
        if online.quant is not None:  # room in the packed part for the flushed tokens
          small = small.replace(quant=online.quant.grown(m_room))
      meta = {**base, "method": spec, "ratio": ratio, "cache_bytes": kept,
              "full_bytes": full_bytes, "compress_s": t_c, "prefill_s": t_p,
              **size_fields(spec, method, kept, full_bytes, len(ctx)),
              "prefill_mode": mode, "peak_cache_bytes": peak}
      plain = None if evicting or batch_cells == 1 else plain_rows(small)
      step(1, f"compressed {spec} @ {ratio:g}")
      if plain is not None:
        pending.append((len(rows), meta, plain))
        rows.append(None)
        continue
      # Decode-time evicting methods evict once the cache is full: their capacity stays exact.
      forced = _bucket(small.resize(small.capacity + room) if evicting else small)
      small = small if evicting else forced
      per_q = []
      for q, (_, answers), (cont, ref_logits, targets) in zip(qs, queries, refs):
        ans, t_a = ask(lm.params, lm.apply_fn, _copy(small), [q], max_new_tokens=max_new_tokens,
                       stop_tokens=lm.stop_tokens, method=method)
        pred = lm.tokenizer.decode(ans[0])
        logits = _force(lm, forced, cont)[len(q) - 1: -1]
        per_q.append({"score": string_match_all(pred, answers), "prediction": pred,
                      **fidelity(logits, ref_logits, targets), "answer_s": t_a})
      rows.append({**meta, **_mean(per_q), "answer_batch": 1})
      step(1, f"answered {spec} @ {ratio:g}")
  for i, row in _answer_batched(lm, pending, qs, queries, refs, room=room,
                                max_new_tokens=max_new_tokens, batch_cells=batch_cells):
    rows[i] = row
    step(1, f"answered {row['method']} @ {row['ratio']:g}")
  return rows


def _stepper(progress, total: int):
  """``step(n, what)``: advances ``progress`` by ``n`` and shows ``what`` (no-op without one)."""
  if progress is None:
    return lambda n, what: None
  progress.reset(total=total)

  def step(n: int, what: str):
    progress.set_postfix_str(what, refresh=False)
    progress.update(n)
  return step


def _answer_batched(lm, pending, qs, queries, refs, *, room, max_new_tokens, batch_cells):
  """Yields ``(index, row)`` for ``pending`` = [(index, row fields, plain cache)], answering
  up to ``batch_cells`` caches of similar length at a time."""
  pending = sorted(pending, key=lambda p: int(jnp.max(p[2].lengths)))
  for start in range(0, len(pending), batch_cells):
    group = pending[start:start + batch_cells]
    b = len(group)
    need = max(int(jnp.max(p[2].lengths)) for p in group) + room
    stacked = stack_rows([p[2] for p in group], gen.round_up(need, _BUCKET))
    per_q = [[] for _ in group]
    for q, (_, answers), (cont, ref_logits, targets) in zip(qs, queries, refs):
      ans, t_a = ask(lm.params, lm.apply_fn, _copy(stacked), [q] * b,
                     max_new_tokens=max_new_tokens, stop_tokens=lm.stop_tokens)
      logits = _force_rows(lm, stacked, cont)[:, len(q) - 1: -1]
      for j in range(b):
        pred = lm.tokenizer.decode(ans[j])
        per_q[j].append({"score": string_match_all(pred, answers), "prediction": pred,
                         **fidelity(logits[j], ref_logits, targets), "answer_s": t_a / b})
    for (i, meta, _), m in zip(group, per_q):
      yield i, {**meta, **_mean(m), "answer_batch": b}


def size_fields(spec: str, method, cache_bytes: int, full_bytes: int,
                prompt_tokens: int) -> dict:
  """A row's ``kept_fraction`` (``methods.kept_fraction``: the product of the evicting members'
  ratios), ``larger_than_full`` and ``warning`` (``methods.size_warning``, also issued as a
  ``MethodWarning``) when the compressed cache's bytes exceed the full cache's."""
  warning = methods_lib.size_warning(spec, cache_bytes, full_bytes, prompt_tokens)
  if warning:
    warnings.warn(warning, methods_lib.MethodWarning, stacklevel=2)
  return {"kept_fraction": 1.0 if method is None else methods_lib.kept_fraction(method),
          "larger_than_full": warning is not None, "warning": warning}


def _mean(per_q: list[dict]) -> dict:
  """Averages per-question metrics (a single question passes through unchanged)."""
  out = {k: float(np.mean([m[k] for m in per_q])) for k in per_q[0] if k != "prediction"}
  out["prediction"] = " | ".join(m["prediction"] for m in per_q)
  return out


def _ll(logits, targets):
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  ll = float(jnp.take_along_axis(lp, targets[:, None], -1).sum())
  return {"ll": ll, "ll_ref": ll}


def run_perplexity(lm, prefix: list[int], continuation: list[int],
                   cells: Sequence[tuple[str, float, Any]], *, seed: int = 0,
                   chunk_size: int = 512, progress=None) -> list[dict]:
  """Perplexity of ``continuation`` after the ``prefix``'s cache was compressed.

  Rows carry ``ppl`` (exp of the mean next-token NLL over the continuation), and KL / top-1
  agreement against the full cache at every continuation position. ``progress`` as in
  ``run_sample`` (``1 + cells`` steps).
  """
  step = _stepper(progress, 1 + len(cells))
  step(0, "prefill")
  c = lm.config
  block = lm.attn_block_size
  gen.check_context([len(prefix) + len(continuation)], 1, c.max_position_embeddings)
  hooks = tuple(dict.fromkeys(m.observe for _, _, m in cells if m.observe is not None))
  observe = methods_lib._joint_observe(hooks) if hooks else None  # pylint: disable=protected-access
  cache, obs_all, t_pre = prefill_context(
      lm.params, lm.apply_fn, [prefix], num_layers=c.num_layers, kv_heads=c.num_kv_heads,
      head_dim=c.head_dim, dtype=lm.dtype, observe=observe, chunk_size=chunk_size, block=block)
  room = gen.round_up(len(continuation), 16) + 16
  targets = jnp.asarray(continuation[1:], jnp.int32)
  base = {"task": "perplexity", "sample": seed, "depth": None, "protocol": "prefix",
          "context_tokens": len(prefix), "prefill_s": t_pre, "n_questions": 0}
  full, full_bytes, _ = compress_for(None, cache, None, room, block)
  full = _bucket(full)
  memo = {}
  ref = _force(lm, full, continuation)[:-1]
  nll = -_ll(ref, targets)["ll"] / len(targets)
  step(1, "full cache")
  rows = [{**base, "method": "full", "ratio": 1.0, "score": None, "ppl": float(np.exp(nll)),
           "kl": 0.0, "top1": 1.0, "ll": -nll, "ll_ref": -nll, "prediction": "",
           "cache_bytes": full_bytes, "full_bytes": full_bytes, "compress_s": 0.0,
           **size_fields("full", None, full_bytes, full_bytes, len(prefix)), "answer_s": 0.0}]
  for spec, ratio, method in cells:
    obs, t_rec = method_observations(lm, method, cache, prefix, obs_all, hooks, chunk_size, memo)
    small, kept, t_c = compress_for(method, cache, obs, room, block)
    t_c += t_rec
    small = _bucket(small)
    logits = _force(lm, small, continuation)[:-1]
    f = fidelity(logits, ref, targets)
    rows.append({**base, "method": spec, "ratio": ratio, "score": None,
                 "ppl": float(np.exp(-f["ll"] / len(targets))), "kl": f["kl"], "top1": f["top1"],
                 "ll": f["ll"] / len(targets), "ll_ref": f["ll_ref"] / len(targets),
                 "prediction": "", "cache_bytes": kept, "full_bytes": full_bytes,
                 **size_fields(spec, method, kept, full_bytes, len(prefix)),
                 "compress_s": t_c, "answer_s": 0.0})
    step(1, f"{spec} @ {ratio:g}")
  return rows
