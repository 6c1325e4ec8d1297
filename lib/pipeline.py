"""The one call: compress a context's KV cache with a method and answer a question from it.

  result = generate(lm, context, question, method="snapkv", ratio=0.5, max_new_tokens=64)
  result.answer, result.cache_bytes / result.full_bytes

``lm`` is a loaded model (``kvlab.load``: params, apply_fn, tokenizer, config). The chat
template is applied here and split so that the context is compressed before the question is
seen (query-agnostic, the default) or with it (``query_aware=True``). Underneath are the three
pure functions (``lib.protocol``): prefill the context with the method's observe hook, compress
(with room for the question and answer, so decoding never writes past the cache), decode.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax

from kvlab.lib import generate as gen
from kvlab.lib import methods as methods_lib
from kvlab.lib.cache import round_capacity
from kvlab.lib.eval.runner import method_observations, prompt_pieces
from kvlab.lib.eval.tasks import Sample
from kvlab.lib.protocol import ask, compress_for, prefill_context


@dataclasses.dataclass
class Result:
  """One answer and what its cache cost.

  answer: the decoded text; tokens: its token ids.
  cache_bytes / full_bytes: the compressed and the full cache of the context, from the leaves,
  without free slots; peak_cache_bytes: the most the cache held while prefilling (the full
  cache, or budget + one chunk with ``compress_during_prefill``).
  prefill_s / compress_s / decode_s: wall-clock seconds (compilation included on first use).
  """

  answer: str
  tokens: list[int]
  method: str
  ratio: float
  context_tokens: int
  cache_bytes: int
  full_bytes: int
  peak_cache_bytes: int
  kept_fraction: float | None
  prefill_s: float
  compress_s: float
  decode_s: float

  @property
  def bytes_ratio(self) -> float:
    """``cache_bytes / full_bytes``."""
    return self.cache_bytes / self.full_bytes


def _method(method, ratio):
  if method is None or method == "full":
    return None, "full"
  if isinstance(method, str):
    return methods_lib.make(method, ratio=ratio), method
  return method, getattr(method, "name", type(method).__name__)


def generate(lm, context: str | Sequence[str], question: str | Sequence[str], *,
             method=None, ratio: float = 0.5, max_new_tokens: int = 64,
             query_aware: bool = False, compress_during_prefill: bool = False,
             chat: bool | None = None, chunk_size: int = 512) -> Result | list[Result]:
  """Compresses ``context``'s cache with ``method`` and answers ``question`` from it.

  Args:
    lm: a loaded model (``kvlab.load``).
    context, question: text, or equal-length lists of texts (one result each).
    method: a registry spec (``"snapkv"``, ``"snapkv+kivi"``, ``"snapkv:window=16"``), a
      method object (``kvlab.methods.make``), or None / ``"full"`` for the full cache.
    ratio: fraction of the context's cache kept (methods that evict tokens).
    max_new_tokens: answer length limit (>= 1).
    query_aware: compress the context together with the question (the method sees it);
      default query-agnostic: the question comes after compression.
    compress_during_prefill: compress after every prefill chunk (``lib.online``): the cache
      never holds more than the budget + one chunk.
    chat: apply the checkpoint's chat template (default: when the tokenizer has one).

  Returns:
    a ``Result`` (a list of them for lists of contexts).
  """
  if isinstance(context, str) != isinstance(question, str):
    raise TypeError("give context and question both as text, or both as lists of texts")
  if not isinstance(context, str):
    if len(context) != len(question):
      raise ValueError(f"{len(context)} contexts but {len(question)} questions: give one "
                       "question per context")
    return [generate(lm, c, q, method=method, ratio=ratio, max_new_tokens=max_new_tokens,
                     query_aware=query_aware, compress_during_prefill=compress_during_prefill,
                     chat=chat, chunk_size=chunk_size) for c, q in zip(context, question)]
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not context or not question:
    raise ValueError("context and question must be non-empty text")
  if lm.tokenizer is None:
    raise ValueError("this model has no tokenizer: use lm.prefill / kvlab.compress / "
                     "lm.decode on token ids")
  m, name = _method(method, ratio)
  tok = lm.tokenizer
  if chat is False and tok.chat_template:
    tok = _NoTemplate(tok)
  if chat and not tok.chat_template:
    raise ValueError("chat=True but this checkpoint has no chat template: pass chat=None")
  sample = Sample(task="user", context=context, question=question, answers=[])
  ctx, q = prompt_pieces(tok, sample, "query_aware" if query_aware else "query_agnostic")
  if not q:  # query-aware without a chat template: the question ends the compressed part
    ctx, q = ctx[:-1], ctx[-1:]
  c = lm.config
  gen.check_context([len(ctx) + len(q)], max_new_tokens, c.max_position_embeddings)
  room = gen.round_up(len(q), 8) + max_new_tokens
  evicting = m is not None and hasattr(m, "update")
  if compress_during_prefill and m is not None:
    from kvlab.lib.online import prefill_context_compressing  # pylint: disable=g-import-not-at-top
    cache, prefill_s, peak = prefill_context_compressing(
        lm.params, lm.apply_fn, [ctx], m, num_layers=c.num_layers, kv_heads=c.num_kv_heads,
        head_dim=c.head_dim, dtype=lm.dtype, chunk_size=chunk_size)
    t0 = time.perf_counter()
    kept = cache.trimmed().nbytes
    need = int(jax.device_get(cache.lengths).max()) + (gen.round_up(len(q), 8) + 1
                                                       if evicting else room)
    small = cache.resize(round_capacity(need))
    if cache.quant is not None:
      small = small.replace(quant=cache.quant.grown(room))
    compress_s = time.perf_counter() - t0
    full_bytes = _full_bytes(lm, len(ctx))
  else:
    cache, obs, prefill_s = prefill_context(
        lm.params, lm.apply_fn, [ctx], num_layers=c.num_layers, kv_heads=c.num_kv_heads,
        head_dim=c.head_dim, dtype=lm.dtype, observe=None if m is None else m.observe,
        chunk_size=chunk_size, block=lm.attn_block_size)
    full_bytes = peak = cache.trimmed().nbytes
    t_rec = 0.0
    if m is not None:
      obs, t_rec = method_observations(lm, m, cache, ctx, (obs,), (m.observe,), chunk_size)
    small, kept, compress_s = compress_for(
        m, cache, obs if m is not None else None,
        gen.round_up(len(q), 8) + 1 if evicting else room, lm.attn_block_size)
    compress_s += t_rec
  answers, decode_s = ask(lm.params, lm.apply_fn, small, [q], max_new_tokens=max_new_tokens,
                          stop_tokens=lm.stop_tokens, method=m)
  out = answers[0]
  return Result(answer=lm.tokenizer.decode(out).strip(), tokens=out, method=name,
                ratio=1.0 if m is None else ratio, context_tokens=len(ctx), cache_bytes=kept,
                full_bytes=full_bytes, peak_cache_bytes=peak,
                kept_fraction=1.0 if m is None else methods_lib.kept_fraction(m),
                prefill_s=prefill_s, compress_s=compress_s, decode_s=decode_s)


def _full_bytes(lm, n: int) -> int:
  """Bytes of the full cache of an ``n``-token context (planned, not allocated)."""
  from kvlab.lib.cache import KVCache  # pylint: disable=g-import-not-at-top
  c = lm.config
  return KVCache.planned_nbytes(num_layers=c.num_layers, batch=1, kv_heads=c.num_kv_heads,
                                capacity=gen.round_up(n, 8), head_dim=c.head_dim,
                                dtype=lm.dtype)


class _NoTemplate:
  """A tokenizer view without its chat template (``chat=False``)."""

  chat_template = None

  def __init__(self, tok):
    self._tok = tok

  def __getattr__(self, name):
    return getattr(self._tok, name)
