"""Model families, checkpoint loaders and tokenizer glue. Entry point: ``models.load``."""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib import generate as gen
from kvlab.lib.cache import KVCache, round_capacity
from kvlab.lib.memory import check_fits
from kvlab.lib.sampling import SamplingConfig
from kvlab.models.config import ModelConfig
from kvlab.models.decoder import make_apply_fn
from kvlab.models.tokenizer import Tokenizer


@dataclasses.dataclass
class LanguageModel:
  """A loaded model: config, params (a plain pytree), tokenizer and the pure ``apply_fn``."""

  config: ModelConfig
  params: Any
  tokenizer: Tokenizer | None
  apply_fn: Callable
  dtype: Any = jnp.float32
  source: str = ""
  attn_block_size: int = 512
  base: bool = False  # a base (not instruction-tuned) model: prompts are raw text, no template

  @property
  def fingerprint(self) -> str:
    """``lib.fingerprint.model_fingerprint`` of config and params: every weight, as bfloat16
    (a float32 and a bfloat16 load agree); computed once per params tree."""
    from kvlab.lib.fingerprint import model_fingerprint  # pylint: disable=g-import-not-at-top
    return model_fingerprint(self.config, self.params)

  @property
  def stop_tokens(self) -> tuple[int, ...]:
    ids = set(self.config.eos_token_ids)
    if self.tokenizer is not None:
      for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"):
        i = self.tokenizer.token_id(t)
        if i is not None:
          ids.add(i)
      if self.tokenizer.eos_id is not None:
        ids.add(self.tokenizer.eos_id)
    return tuple(sorted(ids))

  def new_cache(self, batch: int, capacity: int) -> KVCache:
    """An empty cache of ``[L, batch, K, capacity', H]``; capacity' is rounded up to 8."""
    c = self.config
    cap = round_capacity(capacity, self.attn_block_size)
    kw = dict(num_layers=c.num_layers, batch=batch, kv_heads=c.num_kv_heads, capacity=cap,
              head_dim=c.head_dim, dtype=self.dtype, windows=c.layer_windows)
    check_fits(KVCache.planned_nbytes(**kw), f"a full KV cache of {batch} x {cap} tokens",
               "compress while prefilling (--compress_during_prefill), or lower the batch or "
               "the prompt length")
    return KVCache.init(**kw)

  def generate_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                   sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                   chunk_size: int = 512, stop: bool = True) -> dict:
    """Prefill + jitted decode loop for a batch of token lists (different lengths allowed).

    Returns a dict with ``tokens`` (list of generated id lists), ``prefill_s``, ``decode_s``,
    ``cache`` (the final cache) and ``num_generated``.
    """
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    chunk = min(chunk_size, gen.round_up(max(len(p) for p in prompts) if prompts else 1, 8))
    tokens, lengths = gen.pad_batch(prompts, chunk)
    gen.check_context(lengths, max_new_tokens, self.config.max_position_embeddings)
    cache = self.new_cache(len(prompts), tokens.shape[1] + max_new_tokens)
    gen.check_capacity(cache, tokens.shape[1], max_new_tokens)
    t0 = time.perf_counter()
    logits, cache, _ = gen.prefill(self.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                                   apply_fn=self.apply_fn, chunk_size=chunk)
    logits.block_until_ready()
    t1 = time.perf_counter()
    out, n_gen, cache = gen.decode_loop(
        self.params, cache, logits, jax.random.PRNGKey(seed), apply_fn=self.apply_fn,
        max_new_tokens=max_new_tokens, sampling=sampling,
        stop_tokens=self.stop_tokens if stop else ())
    out = np.asarray(out)
    t2 = time.perf_counter()
    n_gen = np.asarray(n_gen)
    return {"tokens": [out[i, : n_gen[i]].tolist() for i in range(len(prompts))],
            "num_generated": n_gen, "prefill_s": t1 - t0, "decode_s": t2 - t1, "cache": cache,
            "lengths": lengths}

  def prefill(self, ids, *, observe=None, chunk_size: int = 512):
    """Prefills a context (one token-id list, or a list of them) into a full cache.

    ``observe``: a method (``kvlab.methods.make(...)``) or its hook: what the method needs to
    see during prefill. Returns ``(cache [L, B, K, S, H], observations)`` for
    ``kvlab.compress``; KVzip's repeat scores are formed here too (one row).
    """
    from kvlab.lib.eval.runner import method_observations  # pylint: disable=g-import-not-at-top
    from kvlab.lib.protocol import prefill_context  # pylint: disable=g-import-not-at-top
    batch = [list(ids)] if ids and isinstance(ids[0], (int, np.integer)) else [list(x) for x in ids]
    method = observe if hasattr(observe, "scores") or hasattr(observe, "apply") else None
    hook = method.observe if method is not None else observe
    c = self.config
    cache, obs, _ = prefill_context(
        self.params, self.apply_fn, batch, num_layers=c.num_layers, kv_heads=c.num_kv_heads,
        head_dim=c.head_dim, dtype=self.dtype, observe=hook, chunk_size=chunk_size,
        block=self.attn_block_size)
    if method is not None and len(batch) == 1:
      obs, _ = method_observations(self, method, cache, batch[0], (obs,), (hook,), chunk_size)
    # A hybrid model's cache learns its layer kinds here (lib makes it without them), so that
    # kvlab.compress keeps the local layers' windows.
    return cache.replace(windows=c.layer_windows), obs

  def decode(self, cache: KVCache, question, *, max_new_tokens: int = 64, method=None):
    """Appends ``question`` (token ids, one list per cache row) to ``cache`` (consumed) and
    decodes greedily. The cache needs free room for the question and answer (``kvlab.compress``'s
    ``room``); too little raises naming the fix. ``method`` with decode-time eviction (TOVA,
    H2O) evicts instead. Returns the answers as token-id lists."""
    from kvlab.lib.protocol import ask  # pylint: disable=g-import-not-at-top
    qs = [list(question)] if question and isinstance(question[0], (int, np.integer)) else [
        list(q) for q in question]
    answers, _ = ask(self.params, self.apply_fn, cache, qs, max_new_tokens=max_new_tokens,
                     stop_tokens=self.stop_tokens, method=method)
    return answers

  def chat(self, user: str, **kw) -> str:
    """Answers one user message with the checkpoint's chat template; returns the text."""
    ids = self.tokenizer.encode_chat(user)
    res = self.generate_ids([ids], **kw)
    return self.tokenizer.decode(res["tokens"][0])


def load(name_or_path: str, dtype=jnp.float32, progress: bool = True,
         attn_block_size: int = 512, attn_impl: str = "xla") -> LanguageModel:
  """Loads a named model (``smollm2-135m``, the default; ``gemma3-270m``, a base model: its
  prompts are raw text), an HF checkpoint directory or a ``.gguf`` file. ``attn_impl`` picks the
  decode attention over paged stores (``models.decoder.make_apply_fn``)."""
  from kvlab.models import registry, tokenizer as tok_mod  # pylint: disable=g-import-not-at-top

  kind, path = registry.resolve(name_or_path)
  base = registry.is_base(name_or_path)
  if kind == "gguf":
    from kvlab.models.gguf_loader import load_gguf  # pylint: disable=g-import-not-at-top
    cfg, params, reader = load_gguf(path, dtype, progress)
    tokenizer = tok_mod.from_gguf(reader)
  else:
    from kvlab.models.safetensors_loader import load_safetensors_dir  # pylint: disable=g-import-not-at-top
    cfg, params = load_safetensors_dir(path, dtype, progress)
    try:
      tokenizer = tok_mod.from_hf_dir(path)
    except FileNotFoundError:
      tokenizer = None  # weights-only checkpoints (tests) still run on token ids
  if base and tokenizer is not None and tokenizer.chat_template:
    # A base model completes raw text: no chat template unless the caller sets one back
    # (lm.tokenizer.chat_template = lm.tokenizer.base_chat_template).
    tokenizer.base_chat_template, tokenizer.chat_template = tokenizer.chat_template, None
  apply_fn = make_apply_fn(cfg, dtype, attn_block_size, attn_impl)
  # The loaders' temporaries (the file's tensors before conversion) sit in reference cycles:
  # collect them now, or about 0.3 GiB of the default model's load stays resident until some
  # later allocation happens to trigger the collector (memory checks would count it).
  gc.collect()
  return LanguageModel(cfg, params, tokenizer, apply_fn, dtype, source=path,
                       attn_block_size=attn_block_size, base=base)
