"""The embedded default model (SmolLM2-135M-Instruct, GGUF) against transformers' GGUF loader."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from kvlab.lib.data.text import stdlib_docs, text_of_tokens

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_model(default_model):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from kvlab.lib.reference import load_hf_reference  # pylint: disable=g-import-not-at-top
  path = default_model.source
  model = load_hf_reference(path)
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                   gguf_file=os.path.basename(path))
  return model, tok


def test_tokenizer_matches_transformers(default_model, hf_model):
  _, hf_tok = hf_model
  text = stdlib_docs()[5000:9000] + " 12345 3.14159 <|im_start|>user\nHi<|im_end|>"
  assert default_model.tokenizer.encode(text, add_special_tokens=False) == hf_tok.encode(
      text, add_special_tokens=False)
  msgs = [{"role": "user", "content": "What is the capital of France?"}]
  want = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
  assert default_model.tokenizer.apply_chat_template(msgs) == want


def test_logits_and_greedy_generation_match_transformers(default_model, hf_model):
  import torch  # pylint: disable=g-import-not-at-top

  hf, _ = hf_model
  m = default_model
  ids = text_of_tokens(m.tokenizer, 256, offset_chars=20000)
  with torch.no_grad():
    hf_logits = hf(torch.tensor([ids])).logits[0].numpy()
    # 16 greedy tokens: transformers' generate costs ~1 s a token on 2 cores.
    hf_out = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                         min_new_tokens=16)[0, len(ids):].tolist()
  cache = m.new_cache(1, 256)
  logits, _, _ = m.apply_fn(m.params, jnp.asarray([ids]), cache, jnp.asarray([256]))
  err = float(np.abs(np.asarray(logits[0]) - hf_logits).max())
  assert err < 1e-3, f"max-abs logit difference {err}"
  ours = m.generate_ids([ids], max_new_tokens=16, stop=False)["tokens"][0]
  assert ours == hf_out


def test_capital_of_france_is_paris(default_model):
  answer = default_model.chat("What is the capital of France?", max_new_tokens=24)
  assert "Paris" in answer


def test_batched_chat_rows_are_independent(default_model):
  m = default_model
  qs = ["What is the capital of France?", "Name a primary color."]
  ids = [m.tokenizer.encode_chat(q) for q in qs]
  batched = m.generate_ids(ids, max_new_tokens=16)["tokens"]
  for one, got in zip(ids, batched):
    assert m.generate_ids([one], max_new_tokens=16)["tokens"][0] == got


# The 4096-token prefill's peak resident memory (< 4 GiB) is checked by the probe run of
# tests/test_memory.py's memory-limit test.
