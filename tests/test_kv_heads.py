"""KV-head compression (Yu et al. 2024): the weight folds, exactness at K' = K, the RoPE-commuting
key merge, bad input and the HF checkpoint round trip, on tiny random checkpoints."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from kvlab import models
from kvlab.lib import generate as gen
from kvlab.lib.lowrank import kv_heads as kvh
from kvlab.lib.rope import apply_rope
from kvlab.models import hf_export
from kvlab.models.decoder import make_apply_fn
from kvlab.models.tokenizer import Tokenizer

VOCAB = 160


def _samples(seed, n=2, t=48):
  rng = np.random.RandomState(seed)
  return [rng.randint(0, VOCAB, t).tolist() for _ in range(n)]


def _convert(lm, kv_heads, samples=None):
  keys, values = kvh.collect_kv(lm, samples or _samples(0), progress=False)
  cfg, params = kvh.compress_kv_heads(lm.config, lm.params, keys, values, kv_heads)
  return dataclasses.replace(lm, config=cfg, params=params,
                             apply_fn=make_apply_fn(cfg, lm.dtype, lm.attn_block_size))


def _logits(lm, prompt, steps=4, forced=None):
  """Logits after the prefill and ``steps`` decode steps (tokens: greedy, or ``forced``)."""
  cache = lm.new_cache(1, len(prompt) + steps + 8)
  tokens, lengths = gen.pad_batch([prompt], 8)
  logits, cache, _ = gen.prefill(lm.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                                 apply_fn=lm.apply_fn, chunk_size=8)
  out, toks = [logits], []
  for i in range(steps):
    tok = jnp.argmax(logits, -1).astype(jnp.int32) if forced is None else forced[i]
    toks.append(tok)
    logits, cache = gen.decode_step(lm.params, tok, cache, apply_fn=lm.apply_fn)
    out.append(logits)
  return np.stack([np.asarray(x) for x in out]), toks


@pytest.fixture(scope="module")
def llama(tiny_dir):
  path, _ = tiny_dir("llama")  # 4 query heads, 2 kv heads, head dim 16
  return models.load(path, progress=False, attn_block_size=8)


@pytest.fixture(scope="module")
def biased(tiny_dir):
  path, _ = tiny_dir("llama_tied_bias")  # 4 kv heads (MHA), q/k/v/o biases, tied embeddings
  return models.load(path, progress=False, attn_block_size=8)


def test_exact_when_no_heads_are_merged(llama):
  conv = _convert(llama, 2)
  assert conv.config.num_kv_heads == 2
  assert not np.allclose(np.asarray(conv.params["layers"]["wv"]),
                         np.asarray(llama.params["layers"]["wv"]), atol=1e-3)  # a real fold
  prompt = _samples(5, 1, 21)[0]
  ref, toks = _logits(llama, prompt)
  got, _ = _logits(conv, prompt, forced=toks)
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def _all_logits(lm, prompt):
  """``[T, V]`` logits of every prompt position (one forward from an empty cache)."""
  cache = lm.new_cache(1, len(prompt))
  fwd = jax.jit(lambda p, t, c: lm.apply_fn(p, t, c, jnp.array([t.shape[1]]))[0])
  return np.asarray(fwd(lm.params, jnp.asarray([prompt], jnp.int32), cache))[0]


def test_error_falls_as_kv_heads_grow_and_the_cache_shrinks(biased):
  prompt = _samples(7, 1, 40)[0]
  ref = _all_logits(biased, prompt)
  keys, values = kvh.collect_kv(biased, _samples(0, 4, 64), progress=False)
  errs, per_token = [], []
  for kv in (1, 2, 4):
    cfg, params = kvh.compress_kv_heads(biased.config, biased.params, keys, values, kv)
    conv = dataclasses.replace(biased, config=cfg, params=params, apply_fn=make_apply_fn(cfg))
    assert cfg.num_kv_heads == kv and cfg.num_heads == 4
    errs.append(float(np.abs(_all_logits(conv, prompt) - ref).mean()))
    per_token.append(kvh.kv_bytes_per_token(cfg))
    cache = conv.new_cache(1, 32)
    assert cache.keys.shape[2] == kv and cache.values.nbytes * (4 // kv) == (
        biased.new_cache(1, 32).values.nbytes)
  assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5 and errs[0] > 1e-3, errs
  assert per_token == [kvh.kv_bytes_per_token(biased.config) // r for r in (4, 2, 1)]


def _pairs(x):
  p = x.shape[-1] // 2
  return x[..., :p] + 1j * x[..., p:]


def test_rope_fold_equals_the_complex_projection(biased):
  """Keys and queries made by the folded weights, layer by layer on the same random inputs."""
  c = biased.config
  lay = {n: np.asarray(a, np.float64) for n, a in biased.params["layers"].items()}
  rng = np.random.RandomState(0)
  proj = lambda x, n, l: x @ lay["w" + n][l] + lay["b" + n][l]
  x_cal = rng.randn(c.num_layers, 256, c.hidden_size)
  heads = lambda y: y.reshape(y.shape[:-1] + (-1, c.head_dim))  # [..., heads, H]
  keys = np.stack([heads(proj(x_cal[l], "k", l)) for l in range(c.num_layers)])  # [L, M, K, H]
  values = np.stack([heads(proj(x_cal[l], "v", l)) for l in range(c.num_layers)])
  cfg, params = kvh.compress_kv_heads(c, biased.params, keys, values, 2)
  new = {n: np.asarray(a, np.float64) for n, a in params["layers"].items()}
  v = kvh.key_basis(keys, 2)  # [L, K'=2, P, g=2]
  assert np.abs(v.imag).max() > 1e-2  # genuinely complex, so c vs conj(c) matters
  pos = jnp.arange(24)[None]
  inv_freq = jnp.asarray(1.0 / 100.0 ** (np.arange(8) / 8), jnp.float32)
  rope = lambda y: np.asarray(apply_rope(jnp.asarray(y[None], jnp.float32), pos, inv_freq))[0]
  for l in range(c.num_layers):
    x = rng.randn(24, c.hidden_size)
    k_old = heads(proj(x, "k", l))                                   # [T, 4, H]
    k_new = heads(x @ new["wk"][l] + new["bk"][l])                   # [T, 2, H]
    merged = kvh.project_keys(k_old[None], v[l:l + 1])[0]            # [T, 2, H]
    np.testing.assert_allclose(k_new, merged, atol=1e-4)
    # rank-1 reconstruction z_i ~ conj(v_i) w of every original key head
    w = np.repeat(_pairs(merged), 2, 1)                              # [T, 4, P]
    v_head = v[l].transpose(0, 2, 1).reshape(4, -1)                  # [4, P]
    unpair = lambda z: np.concatenate([z.real, z.imag], -1)
    q_old = rope(heads(proj(x, "q", l)))                             # G = 1: head n uses kv n
    q_new = rope(heads(x @ new["wq"][l] + new["bq"][l]))             # head n uses kv n // 2
    want = np.einsum("tnh,snh->nts", q_old, rope(unpair(w * v_head.conj())))
    got = np.einsum("tnh,snh->nts", q_new, np.repeat(rope(k_new), 2, 1))
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)
    wrong = np.einsum("tnh,snh->nts", q_old, rope(unpair(w * v_head)))  # c and conj(c) swapped
    assert np.abs(wrong - got).max() > 1e-2


def test_bad_input_is_refused(biased):
  keys = np.zeros((3, 8, 4, 16), np.float32)
  for bad in (3, 0, 5, -1):
    with pytest.raises(ValueError, match=r"valid values are \[1, 2, 4\]"):
      kvh.compress_kv_heads(biased.config, biased.params, keys, keys, bad)
  qk = dataclasses.replace(biased.config, family="qwen3", qk_norm=True)
  with pytest.raises(ValueError, match="qk_norm"):
    kvh.compress_kv_heads(qk, biased.params, keys, keys, 2)
  with pytest.raises(ValueError, match="collect_kv"):
    kvh.compress_kv_heads(biased.config, biased.params, keys[:, :, :2], keys, 2)


def _byte_tokenizer():
  vocab = {chr(i + 97): i for i in range(26)}
  vocab.update({"<s>": 26, "</s>": 27})
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
  return Tokenizer(tok, bos_token="<s>", eos_token="</s>", chat_template="{{ messages }}",
                   add_bos=True)


def test_save_and_load_round_trip(biased, tmp_path):
  rng = np.random.RandomState(4)  # any calibration: only the round trip is checked here
  keys, values = (rng.randn(3, 64, 4, 16) for _ in range(2))
  cfg, params = kvh.compress_kv_heads(biased.config, biased.params, keys, values, 2)
  conv = dataclasses.replace(biased, config=cfg, params=params, apply_fn=make_apply_fn(cfg))
  out = hf_export.save_converted((conv.config, conv.params), str(tmp_path / "conv"),
                                 tokenizer=_byte_tokenizer())
  back = models.load(out, progress=False, attn_block_size=8)
  assert back.config == conv.config and back.config.num_kv_heads == 2
  assert back.tokenizer.encode("abc") == [26, 0, 1, 2] and back.tokenizer.eos_id == 27
  prompt = _samples(9, 1, 17)[0]
  np.testing.assert_allclose(_all_logits(back, prompt), _all_logits(conv, prompt), atol=1e-5,
                             rtol=0)


def test_hf_config_round_trips_a_gguf_style_config(llama):
  from kvlab.models.config import from_hf_config  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(llama.config, eos_token_ids=(2, 7), bos_token_id=1,
                            rope=dataclasses.replace(llama.config.rope, original_max_position=8192))
  back = from_hf_config(hf_export.hf_config(cfg))
  assert back.num_kv_heads == 2 and back.eos_token_ids == (2, 7)
  same = hf_export._comparable  # pylint: disable=protected-access
  assert same(back) == same(cfg)
  bad = dataclasses.replace(cfg, qkv_bias=True)  # q/k/v bias without o bias: not a Llama config
  with pytest.raises(ValueError, match="attention_bias"):
    hf_export.save_converted((bad, llama.params), "/nonexistent/never-written")
