"""kvlab vs transformers on tiny random checkpoints: prefill logits and 8 greedy decode steps."""

import jax.numpy as jnp
import numpy as np
import pytest

from kvlab import models
from kvlab.lib import generate as gen
from tiny_checkpoints import CONFIGS, hf_greedy, kvlab_greedy_steps

TOL = 1e-4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_and_decode_match_transformers(tiny_dir, name):
  path, hf = tiny_dir(name)
  m = models.load(path, progress=False, attn_block_size=8)
  rng = np.random.RandomState(1)
  ids = rng.randint(0, m.config.vocab_size, size=23).tolist()
  hf_prefill, hf_toks, hf_logits = hf_greedy(hf, ids, 8)

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
  toks, step_logits = kvlab_greedy_steps(m, cache, int(np.argmax(last[0])), 8)
  assert toks == hf_toks
  np.testing.assert_allclose(step_logits, hf_logits, atol=TOL, rtol=0)


def test_decode_loop_matches_stepwise_and_batches_of_different_lengths(tiny_dir):
  """The jitted while-loop equals per-row generation; right padding leaks into no row."""
  path, hf = tiny_dir("llama")
  m = models.load(path, progress=False, attn_block_size=8)
  rng = np.random.RandomState(2)
  prompts = [rng.randint(0, 160, size=n).tolist() for n in (5, 19, 12)]
  batched = m.generate_ids(prompts, max_new_tokens=8, stop=False, chunk_size=8)
  for p, got in zip(prompts, batched["tokens"]):
    _, hf_toks, _ = hf_greedy(hf, p, 7)
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
