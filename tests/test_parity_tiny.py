"""kvlab vs transformers on tiny random checkpoints: prefill logits and 8 greedy decode steps."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kvlab import models
from kvlab.lib import generate as gen
from tiny_checkpoints import CONFIGS

TOL = 1e-4


def _hf_greedy(model, ids, steps):
  """HF prefill logits [T, V] and ``steps`` greedy (token, logits) pairs with its KV cache."""
  with torch.no_grad():
    out = model(torch.tensor([ids]), use_cache=True)
    pkv = out.past_key_values
    prefill = out.logits[0].numpy()
    tok = int(prefill[-1].argmax())
    toks, logits = [tok], []
    for _ in range(steps):
      out = model(torch.tensor([[tok]]), past_key_values=pkv, use_cache=True)
      pkv = out.past_key_values
      lg = out.logits[0, -1].numpy()
      logits.append(lg)
      tok = int(lg.argmax())
      toks.append(tok)
  return prefill, toks, np.stack(logits)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_and_decode_match_transformers(tiny_dir, name):
  path, hf = tiny_dir(name)
  m = models.load(path, progress=False, attn_block_size=8)
  rng = np.random.RandomState(1)
  ids = rng.randint(0, m.config.vocab_size, size=23).tolist()
  hf_prefill, hf_toks, hf_logits = _hf_greedy(hf, ids, 8)

  # Whole prompt in one forward: all-position logits.
  cache = m.new_cache(1, 48)
  logits, cache, _ = m.apply_fn(m.params, jnp.asarray([ids]), cache, jnp.asarray([len(ids)]))
  np.testing.assert_allclose(np.asarray(logits[0]), hf_prefill, atol=TOL, rtol=0)

  # Chunked prefill (chunk 8, attention block 8) + 8 greedy decode steps.
  # dynamic NTK rope depends on the length seen so far, so HF (which scales by the whole
  # prompt) and chunked prefill differ there by design: prefill it in one chunk.
  chunk = 24 if name == "dynamic_rope" else 8
  tokens, lengths = gen.pad_batch([ids], chunk)
  cache = m.new_cache(1, 48)
  last, cache, _ = gen.prefill(m.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                               apply_fn=m.apply_fn, chunk_size=chunk)
  np.testing.assert_allclose(np.asarray(last[0]), hf_prefill[-1], atol=TOL, rtol=0)
  tok = int(np.argmax(last[0]))
  toks, step_logits = [tok], []
  for _ in range(8):
    lg, cache = gen.decode_step(m.params, jnp.asarray([tok], jnp.int32), cache,
                                apply_fn=m.apply_fn)
    step_logits.append(np.asarray(lg[0]))
    tok = int(np.argmax(lg[0]))
    toks.append(tok)
  assert toks == hf_toks
  np.testing.assert_allclose(np.stack(step_logits), hf_logits, atol=TOL, rtol=0)


def test_decode_loop_matches_stepwise_and_batches_of_different_lengths(tiny_dir):
  """The jitted while-loop equals per-row generation; right padding leaks into no row."""
  path, hf = tiny_dir("llama")
  m = models.load(path, progress=False, attn_block_size=8)
  rng = np.random.RandomState(2)
  prompts = [rng.randint(0, 160, size=n).tolist() for n in (5, 19, 12)]
  batched = m.generate_ids(prompts, max_new_tokens=8, stop=False, chunk_size=8)
  for p, got in zip(prompts, batched["tokens"]):
    _, hf_toks, _ = _hf_greedy(hf, p, 7)
    assert got == hf_toks


def test_stop_tokens_end_rows_early(tiny_dir):
  path, _ = tiny_dir("llama")
  m = models.load(path, progress=False, attn_block_size=8)
  prompt = np.random.RandomState(3).randint(0, 160, size=9).tolist()
  free = m.generate_ids([prompt], max_new_tokens=8, stop=False)["tokens"][0]
  stop_at = free[3]
  first = free.index(stop_at)
  m.config = m.config.__class__(**{**m.config.__dict__, "eos_token_ids": (stop_at,)})
  res = m.generate_ids([prompt], max_new_tokens=8)
  assert res["tokens"][0] == free[: first + 1]
  assert int(res["num_generated"][0]) == first + 1
