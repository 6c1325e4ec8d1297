"""Checkpoint-directory variants: sharded index, bf16 weights, tokenizer.json + chat template."""

import copy
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from kvlab import models
from kvlab.models.gguf_loader import unpermute_rows


def test_sharded_bf16_checkpoint_loads_like_transformers(tmp_path, tiny_dir):
  path, hf = tiny_dir("qwen2")
  out = tmp_path / "sharded"
  copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(out, max_shard_size="40KB")
  assert (out / "model.safetensors.index.json").exists()
  assert len(list(out.glob("*.safetensors"))) > 2
  ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
  m = models.load(str(out), progress=False)
  assert m.params["layers"]["wq"].dtype == jnp.float32
  ids = list(range(3, 20))
  with torch.no_grad():
    want = ref(torch.tensor([ids])).logits[0].numpy()
  got, _, _ = m.apply_fn(m.params, jnp.asarray([ids]), m.new_cache(1, 32), jnp.asarray([17]))
  np.testing.assert_allclose(np.asarray(got[0]), want, atol=1e-4, rtol=0)


def test_missing_shard_is_named(tmp_path, tiny_dir):
  _, hf = tiny_dir("qwen2")
  out = tmp_path / "sharded"
  hf.save_pretrained(out, max_shard_size="40KB")
  victim = sorted(out.glob("*.safetensors"))[1]
  os.remove(victim)
  with pytest.raises(ValueError, match=f"shard {victim.name} .* missing"):
    models.load(str(out))


def test_bfloat16_compute_close_to_float32(tiny_dir):
  path, _ = tiny_dir("llama")
  m32 = models.load(path, progress=False)
  m16 = models.load(path, dtype=jnp.bfloat16, progress=False)
  assert m16.new_cache(1, 8).keys.dtype == jnp.bfloat16
  ids = jnp.asarray([list(range(5, 25))])
  a, _, _ = m32.apply_fn(m32.params, ids, m32.new_cache(1, 32), jnp.asarray([20]))
  b, _, _ = m16.apply_fn(m16.params, ids, m16.new_cache(1, 32), jnp.asarray([20]))
  assert float(jnp.abs(a - b).max()) < 0.15 * float(jnp.abs(a).max())


def test_hf_dir_tokenizer_and_chat_template(tmp_path, tiny_dir, default_model):
  """An HF dir's tokenizer.json + tokenizer_config.json give the same ids and template."""
  path, _ = tiny_dir("llama")
  d = tmp_path / "withtok"
  d.mkdir()
  for f in os.listdir(path):
    (d / f).write_bytes(open(os.path.join(path, f), "rb").read())
  src = default_model.tokenizer
  src._tok.save(str(d / "tokenizer.json"))  # pylint: disable=protected-access
  json.dump({"chat_template": src.chat_template, "bos_token": src.bos_token,
             "eos_token": {"content": src.eos_token}, "add_bos_token": False},
            open(d / "tokenizer_config.json", "w"))
  m = models.load(str(d), progress=False)
  text = "Tokenizers split 12345 digits; <|im_start|> stays whole."
  assert m.tokenizer.encode(text) == src.encode(text)
  assert m.tokenizer.encode_chat("Hi") == src.encode_chat("Hi")
  assert m.tokenizer.eos_id == src.eos_id


def test_unpermute_inverts_llama_cpp_permutation():
  rng = np.random.RandomState(0)
  n_head, h, d = 3, 8, 5
  w = rng.randn(n_head * h, d)
  # llama.cpp's converter: per head, rows (i, i + h/2) become (2i, 2i + 1).
  permuted = w.reshape(n_head, 2, h // 2, d).swapaxes(1, 2).reshape(w.shape)
  np.testing.assert_array_equal(unpermute_rows(permuted, n_head), w)
