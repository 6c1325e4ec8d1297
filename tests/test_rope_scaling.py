"""RoPE scaling variants yarn and longrope: frequencies and attention factor against
transformers' ``ROPE_INIT_FUNCTIONS``, and tiny random Llama / Qwen3 checkpoints against
transformers fp32 at prompt lengths beyond ``original_max_position_embeddings``."""

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from transformers import modeling_rope_utils

from kvlab import models
from kvlab.lib import generate as gen
from kvlab.lib.rope import SUPPORTED_ROPE_TYPES, RopeConfig, base_inv_freq, inv_freq_for
from kvlab.models.config import from_hf_config, rope_from_hf
from tiny_checkpoints import hf_greedy, kvlab_greedy_steps
from tiny_checkpoints import CONFIGS, make_checkpoint

TOL = 1e-4
ORIG = 16  # original_max_position_embeddings of the tiny checkpoints; prompts run to 40
_H = 16    # head dim of tiny_checkpoints' Llama (64 / 4 heads)
_rng = np.random.RandomState(0)
_SHORT = [float(x) for x in 1.0 + _rng.rand(_H // 2)]
_LONG = [float(x) for x in 1.0 + 6.0 * _rng.rand(_H // 2)]

# name -> (config class, overrides); built with tiny_checkpoints.make_checkpoint.
ROPE_CONFIGS = {
    "llama_yarn": ("LlamaConfig", dict(max_position_embeddings=4 * ORIG, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG})),
    # DeepSeek-style attention factor from mscale / mscale_all_dim; no truncation.
    "llama_yarn_mscale": ("LlamaConfig", dict(max_position_embeddings=8 * ORIG, rope_scaling={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIG,
        "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16.0, "beta_slow": 2.0,
        "truncate": False})),
    # Qwen3's recommended long-context form (head_dim 32, qk-norm) with an explicit factor.
    "qwen3_yarn": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True,
                                       use_sliding_window=False, rope_theta=1000000.0,
                                       max_position_embeddings=4 * ORIG, rope_scaling={
                                           "rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": ORIG,
                                           "attention_factor": 1.25})),
    # factor left out: max_position_embeddings / original = 4, attention sqrt(1 + ln 4 / ln 16).
    "llama_longrope": ("LlamaConfig", dict(max_position_embeddings=4 * ORIG, rope_scaling={
        "rope_type": "longrope", "short_factor": _SHORT, "long_factor": _LONG,
        "original_max_position_embeddings": ORIG})),
}


@pytest.fixture(scope="module")
def rope_dir(tmp_path_factory):
  """``make(name) -> (path, torch model)``; each checkpoint built once."""
  root = tmp_path_factory.mktemp("rope")
  built = {}

  def make(name):
    if name not in built:
      with pytest.MonkeyPatch.context() as mp:
        mp.setitem(CONFIGS, name, ROPE_CONFIGS[name])
        path = str(root / name)
        built[name] = (path, make_checkpoint(name, path))
    return built[name]

  return make


def _hf_config(name):
  cls_name, over = ROPE_CONFIGS[name]
  return getattr(transformers, cls_name)(hidden_size=64, num_attention_heads=4, **over)


@pytest.mark.parametrize("name", sorted(ROPE_CONFIGS))
def test_frequencies_and_attention_factor_match_transformers(name):
  hf = _hf_config(name)
  rope = rope_from_hf(hf.to_dict(), hf.head_dim)
  kind = rope.rope_type
  inv, factor = modeling_rope_utils.ROPE_INIT_FUNCTIONS[kind](hf, None)
  np.testing.assert_array_equal(base_inv_freq(rope), inv.numpy())
  assert rope.attention_scale == pytest.approx(factor, rel=1e-12)
  if kind == "longrope":  # past the original length: the long factors
    long_inv, _ = modeling_rope_utils.ROPE_INIT_FUNCTIONS[kind](hf, None, seq_len=ORIG + 1)
    np.testing.assert_array_equal(np.asarray(inv_freq_for(rope, ORIG + 1)), long_inv.numpy())
    np.testing.assert_array_equal(np.asarray(inv_freq_for(rope, ORIG)), inv.numpy())
  else:  # static: the length does not matter
    np.testing.assert_array_equal(np.asarray(inv_freq_for(rope, 5 * ORIG)), inv.numpy())


def test_rope_from_hf_reads_both_config_forms_and_defaults():
  old = {"rope_theta": 5e5, "max_position_embeddings": 128,
         "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}}
  new = {"max_position_embeddings": 128, "rope_parameters": {
      "rope_type": "yarn", "rope_theta": 5e5, "factor": 2.0,
      "original_max_position_embeddings": 64}}
  a, b = rope_from_hf(old, 64), rope_from_hf(new, 64)
  assert a == b
  assert (a.rope_type, a.theta, a.factor, a.original_max_position) == ("yarn", 5e5, 2.0, 64)
  assert (a.beta_fast, a.beta_slow, a.truncate, a.attention_factor) == (32.0, 1.0, True, None)
  assert a.attention_scale == pytest.approx(0.1 * np.log(2.0) + 1.0)
  # No factor: the ratio of the two lengths (HF); no scaling: scale 1.
  c = rope_from_hf({"max_position_embeddings": 256, "rope_scaling": {
      "rope_type": "yarn", "original_max_position_embeddings": 64}}, 64)
  assert c.factor == 4.0
  assert rope_from_hf({"rope_theta": 1e4}, 64).attention_scale == 1.0
  hash(rope_from_hf(_hf_config("llama_longrope").to_dict(), _H))  # a jit static argument


def test_unknown_rope_type_lists_what_is_supported():
  assert SUPPORTED_ROPE_TYPES == ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
  with pytest.raises(ValueError, match="'su' is not supported.*'yarn', 'longrope'"):
    rope_from_hf({"rope_scaling": {"type": "su", "factor": 2.0}}, 64)
  with pytest.raises(ValueError, match="long_factor with head_dim / 2 = 8 entries, got 3"):
    RopeConfig(head_dim=16, rope_type="longrope", short_factor=(1.0,) * 8,
               long_factor=(1.0,) * 3)


@pytest.mark.parametrize("name", sorted(ROPE_CONFIGS))
def test_logits_match_transformers_beyond_original_length(rope_dir, name):
  """Prefill of 40 tokens (original length 16) in one forward, then 6 greedy decode steps;
  static variants also through chunked prefill (chunks of 8)."""
  path, hf = rope_dir(name)
  m = models.load(path, progress=False, attn_block_size=8)
  assert m.config.rope == from_hf_config(hf.config.to_dict()).rope
  assert m.config.rope.attention_scale != 1.0  # the factor is exercised
  ids = np.random.RandomState(1).randint(0, m.config.vocab_size, size=40).tolist()
  hf_prefill, hf_toks, hf_logits = hf_greedy(hf, ids, 6)

  cache = m.new_cache(1, 64)
  logits, cache, _ = m.apply_fn(m.params, jnp.asarray([ids]), cache, jnp.asarray([len(ids)]))
  np.testing.assert_allclose(np.asarray(logits[0]), hf_prefill, atol=TOL, rtol=0)
  toks, step_logits = kvlab_greedy_steps(m, cache, int(np.argmax(logits[0, -1])), 6)
  assert toks == hf_toks
  np.testing.assert_allclose(step_logits, hf_logits, atol=TOL, rtol=0)

  if m.config.rope.rope_type == "longrope":
    return  # its frequencies switch with the length reached: chunks differ from HF by design
  tokens, lengths = gen.pad_batch([ids], 8)
  cache = m.new_cache(1, 64)
  last, _, _ = gen.prefill(m.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                           apply_fn=m.apply_fn, chunk_size=8)
  np.testing.assert_allclose(np.asarray(last[0]), hf_prefill[-1], atol=TOL, rtol=0)
