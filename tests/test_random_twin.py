"""models/random_twin.py (launcher: experiments/random_twin.py): a model's config and tokenizer with random weights, loaded alike by
kvlab and transformers (the GPU timings of the default model run on it)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from kvlab import models
from kvlab.models import random_twin
from kvlab.lib import generate as gen
from kvlab.models.safetensors_loader import read_hf_config
from kvlab.models.config import from_hf_config


def test_random_weights_load_alike_in_kvlab_and_transformers(tmp_path):
  cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128, tie_word_embeddings=True)
  cfg.save_pretrained(tmp_path)
  random_twin.write_weights(str(tmp_path), seed=3)
  lm = models.load(str(tmp_path), progress=False)
  ids = list(np.random.RandomState(0).randint(0, 96, size=40))
  tokens, lengths = gen.pad_batch([ids], 64)
  logits, _, _ = gen.prefill(lm.params, jnp.asarray(tokens), jnp.asarray(lengths),
                             lm.new_cache(1, tokens.shape[1]), apply_fn=lm.apply_fn, chunk_size=64)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  with torch.no_grad():
    want = hf(torch.tensor([ids])).logits[0, -1].numpy()
  got = np.asarray(logits).reshape(-1, want.shape[0])[-1]
  assert np.abs(want).max() > 1e-3  # not all zero
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  # the seed fixes the weights: another seed gives other logits
  other = tmp_path / "other"
  cfg.save_pretrained(other)
  random_twin.write_weights(str(other), seed=4)
  hf4 = transformers.AutoModelForCausalLM.from_pretrained(str(other), dtype=torch.float32)
  with torch.no_grad():
    assert not np.allclose(hf4(torch.tensor([ids])).logits[0, -1].numpy(), want)


@pytest.mark.slow
def test_twin_config_and_tokenizer_are_the_default_models(tmp_path, default_model):
  random_twin.write_config("smollm2-135m", str(tmp_path))
  assert not os.path.exists(tmp_path / "model.safetensors")  # config stage writes no weights
  twin = from_hf_config(read_hf_config(str(tmp_path)))
  ref = default_model.config
  for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "tie_word_embeddings"):
    assert getattr(twin, field) == getattr(ref, field), field
  assert twin.rope.theta == ref.rope.theta
  assert twin.num_params == ref.num_params
  from kvlab.models.tokenizer import from_hf_dir  # pylint: disable=g-import-not-at-top
  tok = from_hf_dir(str(tmp_path))
  text = "def f(x):\n    return x ** 2  # Paris, 2026 <|im_start|>"
  assert tok.encode(text) == default_model.tokenizer.encode(text)
  assert tok.eos_id == default_model.tokenizer.eos_id
  with open(tmp_path / "tokenizer_config.json") as f:
    assert json.load(f)["chat_template"] == default_model.tokenizer.chat_template
  with pytest.raises(ValueError, match="already an HF directory"):
    random_twin.write_config(str(tmp_path), str(tmp_path / "again"))
