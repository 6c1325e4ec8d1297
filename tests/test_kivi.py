"""KIVI in the one cache pytree: packed codes + residual window, read by attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvlab import models
from kvlab.lib import generate as gen
from kvlab.lib import methods
from kvlab.lib.cache import KVCache
from kvlab.lib.methods.kivi import KIVI
from kvlab.lib.quant.uniform import Quantized, dequantize


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  path, _ = tiny_dir("llama")  # head dim 16
  return models.load(path, progress=False, attn_block_size=8)


def _prefill(m, prompts, chunk=32):
  tokens, lengths = gen.pad_batch(prompts, chunk)
  cache = m.new_cache(len(prompts), tokens.shape[1])
  _, cache, _ = gen.prefill(m.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                            apply_fn=m.apply_fn, chunk_size=chunk)
  return cache


def _dequantized(cache: KVCache) -> KVCache:
  """The same tokens as a full-precision cache: dequantized part, then the residual."""
  q = cache.quant
  k = dequantize(Quantized(q.k_codes, q.k_scale, q.k_zero), q.k_bits, q.group, -2)
  v = dequantize(Quantized(q.v_codes, q.v_scale, q.v_zero), q.v_bits, q.group, -1)
  n_q = np.asarray(q.lengths)
  keys = np.concatenate([np.asarray(k), np.asarray(cache.keys)], 3)
  vals = np.concatenate([np.asarray(v), np.asarray(cache.values)], 3)
  pos = np.concatenate([np.asarray(q.positions), np.asarray(cache.positions)], 3)
  tot = n_q + np.asarray(cache.lengths)
  out_k, out_v, out_p = np.zeros_like(keys), np.zeros_like(vals), np.full(pos.shape, -1)
  for idx in np.ndindex(*n_q.shape):  # pack each head's valid slots at the front
    sel = np.concatenate([np.arange(n_q[idx]), q.capacity + np.arange(cache.lengths[idx])])
    out_k[idx][: len(sel)] = keys[idx][sel]
    out_v[idx][: len(sel)] = vals[idx][sel]
    out_p[idx][: len(sel)] = pos[idx][sel]
  return KVCache(keys=jnp.asarray(out_k), values=jnp.asarray(out_v),
                 positions=jnp.asarray(out_p, jnp.int32), lengths=jnp.asarray(tot, jnp.int32),
                 next_position=cache.next_position)


def _logits(m, cache, tokens):
  logits, _, _ = m.apply_fn(m.params, jnp.asarray([tokens] * cache.batch, jnp.int32), cache,
                            jnp.full((cache.batch,), len(tokens), jnp.int32), None, None)
  return np.asarray(logits)


def test_attention_reads_the_packed_codes_exactly_as_their_dequantized_values(tiny):
  rng = np.random.RandomState(0)
  prompts = [rng.randint(0, 160, size=n).tolist() for n in (200, 131)]
  full = _prefill(tiny, prompts)
  q = methods.compress(KIVI(bits=2, group=16, residual=32), full, extra=16)
  assert q.quant is not None and q.quant.k_codes.dtype == jnp.uint32
  n_q = np.asarray(q.quant.lengths)
  np.testing.assert_array_equal(n_q[:, 0], 160)  # (200 - 32) // 16 * 16
  np.testing.assert_array_equal(n_q[:, 1], 96)   # (131 - 32) // 16 * 16
  np.testing.assert_array_equal(np.asarray(q.lengths) + n_q, np.asarray(full.lengths))
  cont = rng.randint(0, 160, size=9).tolist()
  np.testing.assert_allclose(_logits(tiny, q, cont), _logits(tiny, _dequantized(q), cont),
                             rtol=1e-4, atol=1e-4)


def test_more_bits_track_the_full_cache_and_fewer_bits_save_bytes(tiny):
  rng = np.random.RandomState(1)
  full = _prefill(tiny, [rng.randint(0, 160, size=240).tolist()])
  cont = rng.randint(0, 160, size=8).tolist()
  ref = _logits(tiny, full.resize(full.capacity + 8), cont)
  errs, sizes = {}, {}
  for bits in (8, 4, 2):
    q = methods.compress(KIVI(bits=bits, group=16, residual=32), full, extra=8)
    errs[bits] = np.abs(_logits(tiny, q, cont) - ref).max()
    sizes[bits] = q.resize(int(jnp.max(q.lengths))).nbytes
  assert errs[8] < errs[4] < errs[2] and errs[8] < 0.1 * errs[2]
  assert sizes[2] < sizes[4] < sizes[8] < full.nbytes
  assert sizes[2] < 0.35 * full.nbytes  # 2-bit codes + fp16 scales + int32 positions


def test_evict_then_quantize_and_invalid_orders(tiny):
  rng = np.random.RandomState(2)
  ids = rng.randint(0, 160, size=220).tolist()
  tokens, lengths = gen.pad_batch([ids], 32)
  m = methods.make("snapkv+kivi4", ratio=0.5)
  assert m.methods[1].bits == 4
  cache = tiny.new_cache(1, tokens.shape[1])
  _, cache, obs = gen.prefill(tiny.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                              apply_fn=tiny.apply_fn, chunk_size=32, observe=m.observe)
  with pytest.raises(ValueError, match="group 32 must divide the head dim 16"):
    methods.compress(m, cache, obs)
  m = methods.Compose((methods.make("snapkv", ratio=0.5), KIVI(bits=4, group=16, residual=16)))
  out = methods.compress(m, cache, obs, extra=8)
  assert int(out.quant.lengths[0, 0, 0]) + int(out.lengths[0, 0, 0]) == 110
  with pytest.raises(ValueError, match="low-rank \\(kivi\\) must come last.*snapkv\\+kivi"):
    methods.make("kivi+snapkv", ratio=0.5)
  with pytest.raises(ValueError, match="keeps every token"):
    methods.make("kivi", ratio=0.5)
  assert methods.make("kivi", ratio=1.0).bits == 2
  with pytest.raises(ValueError, match="multiple of group"):
    KIVI(group=32, residual=48)
  with pytest.raises(ValueError, match="unsupported bit width 5"):
    KIVI(bits=5)
  with pytest.raises(ValueError, match="multiple of 32"):
    methods.compress(KIVI(bits=3, group=16, residual=16), cache)


def test_decoding_from_a_quantized_cache(tiny):
  """8-bit KIVI answers like the full cache (greedy), through the jitted decode loop."""
  from kvlab.lib.protocol import compress_then_ask  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(3)
  ctx = [rng.randint(0, 160, size=150).tolist()]
  question = [rng.randint(0, 160, size=6).tolist()]
  kw = dict(max_new_tokens=8, num_layers=3, kv_heads=2, head_dim=16, block=8)
  full = compress_then_ask(tiny.params, tiny.apply_fn, ctx, question, **kw)
  q8 = compress_then_ask(tiny.params, tiny.apply_fn, ctx, question,
                         method=KIVI(bits=8, group=16, residual=16), **kw)
  assert q8["tokens"] == full["tokens"]
  assert q8["cache_bytes"] < 0.45 * full["full_bytes"]


def test_decode_loop_streams_the_window_into_packed_codes(tiny):
  """Inside the jitted decode loop, full groups leave the window for the packed store: every
  position is held exactly once, the window stays below residual + group."""
  rng = np.random.RandomState(4)
  prompts = [rng.randint(0, 160, size=n).tolist() for n in (90, 61)]
  full = _prefill(tiny, prompts)
  q = methods.compress(KIVI(bits=4, group=16, residual=16), full, extra=48)
  n0 = np.asarray(q.quant.lengths).copy()
  logits = jnp.asarray(rng.randn(2, 160), jnp.float32)
  _, n_gen, out = gen.decode_loop(tiny.params, q, logits, jax.random.PRNGKey(0),
                                  apply_fn=tiny.apply_fn, max_new_tokens=40)
  assert (np.asarray(n_gen) == 40).all()
  nq, nr = np.asarray(out.quant.lengths), np.asarray(out.lengths)
  assert (nq > n0).all() and (nr < 16 + 16).all() and (nq % 16 == 0).all()
  qp, rp = np.asarray(out.quant.positions), np.asarray(out.positions)
  for idx in np.ndindex(*nq.shape):
    seen = np.concatenate([qp[idx][: nq[idx]], rp[idx][: nr[idx]]])
    total = (90, 61)[idx[1]] + 40 - 1  # the last sampled token is not appended
    np.testing.assert_array_equal(np.sort(seen), np.arange(total))
  # The streamed codes are the tokens' real keys: attention over them == over dequantized.
  cont = rng.randint(0, 160, size=5).tolist()
  roomy = out.resize(out.capacity + 8)
  np.testing.assert_allclose(_logits(tiny, roomy, cont), _logits(tiny, _dequantized(roomy), cont),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 4])
def test_decode_through_the_kernel_matches_xla(tiny, tiny_dir, bits):
  """``attn_impl="interpret"``: every decode step reads the packed codes with the Pallas kernel
  (interpret mode) and merges its log normaliser with the window; while the loop streams groups
  into the codes, the tokens and logits equal the XLA path's."""
  path, _ = tiny_dir("llama")
  kern = models.load(path, progress=False, attn_block_size=8, attn_impl="interpret")
  rng = np.random.RandomState(5)
  prompts = [rng.randint(0, 160, size=n).tolist() for n in (90, 61)]
  full = _prefill(tiny, prompts)
  q = methods.compress(KIVI(bits=bits, group=16, residual=16), full, extra=24)
  logits = jnp.asarray(rng.randn(2, 160), jnp.float32)
  outs = []
  for m in (tiny, kern):
    toks, _, final = gen.decode_loop(m.params, jax.tree.map(jnp.copy, q), logits,
                                     jax.random.PRNGKey(0), apply_fn=m.apply_fn,
                                     max_new_tokens=20)
    last, _ = gen.decode_step(m.params, toks[:, -1], final, apply_fn=m.apply_fn)
    outs.append((np.asarray(toks), np.asarray(last)))
  np.testing.assert_array_equal(outs[1][0], outs[0][0])
  np.testing.assert_allclose(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)
