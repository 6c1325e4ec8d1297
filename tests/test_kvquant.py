"""KVQuant: datatypes, outliers, the pre-RoPE store, calibration (Fisher via jax.grad, orbax)
and decoding from the quantized cache on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvlab import models
from kvlab.lib import generate as gen
from kvlab.lib import methods
from kvlab.lib.methods.kvquant import KVQuant
from kvlab.lib.quant import kvquant_calibrate as calib
from kvlab.lib.quant import nuq
from kvlab.lib.quant.kvquant_store import KVQuantStore
from kvlab.lib.rope import rotate


def test_weighted_kmeans_finds_the_heavy_modes():
  rng = np.random.RandomState(0)
  x = np.concatenate([rng.normal(-0.6, 0.02, 3000), rng.normal(0.1, 0.02, 3000),
                      rng.normal(0.7, 0.02, 3000), rng.uniform(-1, 1, 3000)])
  w = np.concatenate([np.ones(9000), np.full(3000, 1e-4)])  # the uniform part barely counts
  lut = np.asarray(nuq.kmeans_1d(jnp.asarray(x), jnp.asarray(w), 3))
  np.testing.assert_allclose(lut, [-0.6, 0.1, 0.7], atol=0.02)
  # weights matter: weighting the uniform part heavily pulls the centroids apart
  lut_u = np.asarray(nuq.kmeans_1d(jnp.asarray(x), jnp.asarray(1.0 / w), 3))
  assert np.abs(lut_u - [-0.6, 0.1, 0.7]).max() > 0.05


def test_kmeans_lowers_the_weighted_error_against_uniform_levels():
  rng = np.random.RandomState(1)
  x = np.clip(rng.standard_t(3, 20000) / 4, -1, 1)  # heavy-tailed like activations
  w = rng.exponential(1.0, x.size)
  err = lambda lut: float((w * (x - np.asarray(lut)[np.asarray(nuq.encode(x, lut))]) ** 2).sum())
  lut = nuq.kmeans_1d(jnp.asarray(x), jnp.asarray(w), 8)
  assert err(lut) < 0.75 * err(jnp.linspace(-1, 1, 8))  # measured 0.64


def test_qnorm_matches_mean_and_std():
  x = jnp.asarray(np.random.RandomState(2).normal(0.1, 0.3, 5000).clip(-1, 1))
  lut = jnp.asarray([-0.9, -0.2, 0.3, 0.8])
  y = nuq.qnorm(lut, x)
  q = y[nuq.encode(x, lut)]
  assert abs(float(q.mean() - x.mean())) < 1e-5 and abs(float(q.std() - x.std())) < 1e-5


def test_outlier_overlay_round_trip():
  u = jnp.asarray([[0.1, -3.0, 0.5, 2.0], [0.2, 0.3, -0.4, 0.9]])
  idx, dense = nuq.split_outliers(u, 1)
  assert idx.tolist() == [[1], [3]] and float(dense[0, 1]) == 0.0 and float(dense.max()) <= 1
  back = nuq.overlay(dense, idx, jnp.take_along_axis(u, idx.astype(jnp.int32), -1))
  np.testing.assert_allclose(back, jnp.clip(u, -1, 1).at[0, 1].set(-3.0).at[1, 3].set(0.9))
  assert nuq.outlier_count(64, 0.01) == 1 and nuq.outlier_count(128, 0.01) == 2
  with pytest.raises(ValueError, match="outlier fraction"):
    nuq.outlier_count(64, 0.7)


def _store(bits, n_out, seed, length=40, h=64):
  rng = np.random.RandomState(seed)
  l, b, k = 2, 2, 3
  inv_freq = jnp.asarray(1.0 / 10000 ** (np.arange(0, h, 2) / h), jnp.float32)
  k_pre = rng.randn(l, b, k, length, h).astype(np.float32) * np.linspace(0.2, 3, h)
  k_pre[..., 7] += 6.0  # an outlier channel, the reason for per-channel keys
  vals = rng.randn(l, b, k, length, h).astype(np.float32)
  pos = np.broadcast_to(np.arange(length) * 3 + 5, (l, b, k, length)).astype(np.int32)
  keys = rotate(jnp.asarray(k_pre), jnp.asarray(pos), inv_freq)
  off = k_pre.mean(3).mean(1)   # [L, K, H]
  rng_ = np.abs(k_pre - off[:, None, :, None]).max(3).max(1) * 0.9
  lut = jnp.asarray(np.tile(np.linspace(-1, 1, 1 << bits), (l, 1)), jnp.float32)
  lengths = jnp.full((l, b, k), length - 3, jnp.int32)
  st_ = KVQuantStore.build(keys, jnp.asarray(vals), jnp.asarray(pos), lengths, k_lut=lut,
                           v_lut=lut, k_offset=jnp.asarray(off), k_range=jnp.asarray(rng_),
                           inv_freq=inv_freq, n_outliers=n_out)
  return st_, keys, vals, pos, rng_


@settings(max_examples=12, deadline=None)
@given(bits=st.sampled_from((2, 3, 4)), n_out=st.sampled_from((0, 1, 2)),
       seed=st.integers(0, 2**16))
def test_store_reads_back_rotated_keys_within_the_step(bits, n_out, seed):
  s, keys, vals, pos, k_rng = _store(bits, n_out, seed)
  step = 2.0 / ((1 << bits) - 1)  # uniform LUT spacing in normalised units
  for layer in range(2):
    k_hat, v_hat, p_hat = s.read(layer, 0, 40)
    np.testing.assert_array_equal(np.asarray(p_hat)[..., :37], pos[layer, ..., :37])
    assert (np.asarray(p_hat)[..., 37:] == -1).all()
    # keys: the pre-RoPE error per channel is at most half a step of that channel's range
    # (inliers), 0 for kept outliers; rotation preserves the pair norms
    k_pre_hat = rotate(k_hat, -jnp.asarray(np.maximum(p_hat, 0)), s.inv_freq)
    k_pre = rotate(keys[layer], -jnp.asarray(pos[layer]), s.inv_freq)
    err = np.abs(np.asarray(k_pre_hat - k_pre))[..., :37, :]
    bound = step / 2 * k_rng[layer][None, :, None, :] + 1e-4
    u = np.abs((np.asarray(k_pre) - np.asarray(s.k_offset[layer])[None, :, None, :])
               / k_rng[layer][None, :, None, :])[..., :37, :]
    inlier = u <= 1.0
    assert (err[inlier] <= np.broadcast_to(bound, err.shape)[inlier]).all()
    # values: per-token range, error <= half a step of the token's range
    v = vals[layer][..., :37, :]
    v_err = np.abs(np.asarray(v_hat)[..., :37, :] - v)
    span = v.max(-1, keepdims=True) - v.min(-1, keepdims=True)
    assert (v_err <= step / 2 * span / 2 * 1.01 + 1e-2).all()
    if n_out:  # the largest deviation of every value vector is exact (float16)
      med = np.median(v, -1, keepdims=True)
      far = np.argmax(np.abs(v - med), -1)
      got = np.take_along_axis(np.asarray(v_hat)[..., :37, :], far[..., None], -1)
      want = np.take_along_axis(v, far[..., None], -1)
      np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-3)


def test_store_bytes_and_three_bit_layout():
  s, *_ = _store(3, 1, 0, length=64)
  assert s.k_codes.shape[-1] == 6 and s.k_codes.dtype == jnp.uint32  # 64 x 3 bit = 6 words
  per_token = sum(x.nbytes for x in (s.k_codes, s.k_out_idx, s.k_out_val, s.v_codes,
                                     s.v_offset, s.v_range, s.v_out_idx, s.v_out_val))
  per_token /= np.prod(s.k_codes.shape[:4])
  assert per_token == 24 + 3 + 24 + 4 + 3  # vs 256 bytes of bf16 keys + values


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  path, _ = tiny_dir("qwen3")  # head dim 32: packs at 2, 3 and 4 bit
  return models.load(path, progress=False, attn_block_size=8)


@pytest.fixture(scope="module")
def calibration(tiny, tmp_path_factory):
  rng = np.random.RandomState(0)
  samples = [rng.randint(0, 160, 48).tolist() for _ in range(3)]
  cal = calib.calibrate(tiny, samples, bits=(2, 3, 4), iters=20, model_name="tiny-qwen3",
                        progress=False)
  path = calib.save(cal, str(tmp_path_factory.mktemp("cal") / "kvquant"))
  return cal, path


def test_fisher_is_the_squared_gradient(tiny):
  toks = np.random.RandomState(5).randint(0, 160, 24).tolist()
  k, v, fk, fv = (np.asarray(a) for a in calib.kv_and_fisher(tiny, toks))
  c = tiny.config
  assert k.shape == (c.num_layers, 24, c.num_kv_heads, c.head_dim) == fk.shape
  assert (fk >= 0).all() and fk.sum() > 0 and fv.sum() > 0
  # finite difference on one value activation through the probe
  from kvlab.models.decoder import Decoder  # pylint: disable=g-import-not-at-top
  dec = Decoder(c, tiny.dtype, tiny.attn_block_size)
  t = jnp.asarray(toks)[None]
  cache = tiny.new_cache(1, 24)

  def loss(dv):
    z = jnp.zeros((c.num_layers, 1, 24, c.num_kv_heads, c.head_dim))
    logits, _, _ = dec.apply({"params": tiny.params}, t, cache, jnp.array([24]), None, (z, dv))
    lp = jax.nn.log_softmax(logits[0, :-1])
    return -jnp.take_along_axis(lp, t[0, 1:, None], 1).mean()

  e = 1e-2
  z = jnp.zeros((c.num_layers, 1, 24, c.num_kv_heads, c.head_dim))
  l_, t_, k_, h_ = np.unravel_index(np.argmax(fv), fv.shape)  # the most sensitive value
  fd = (loss(z.at[l_, 0, t_, k_, h_].add(e)) - loss(z.at[l_, 0, t_, k_, h_].add(-e))) / (2 * e)
  np.testing.assert_allclose(float(fd) ** 2, fv[l_, t_, k_, h_], rtol=0.05)


def test_calibration_round_trips_through_orbax(calibration, tiny):
  cal, path = calibration
  back = calib.load(path)
  np.testing.assert_array_equal(back.k_offset, cal.k_offset)
  np.testing.assert_array_equal(back.inv_freq, cal.inv_freq)
  for key in ("k2", "v3", "k4"):
    np.testing.assert_array_equal(back.luts[key], cal.luts[key])
    assert (np.diff(back.luts[key], axis=-1) > 0).all()  # sorted, distinct centroids
  assert back.meta["fingerprint"] == calib.model_fingerprint(tiny.config, tiny.params)
  back.check_model(calib.model_fingerprint(tiny.config, tiny.params))


def test_calibration_errors(calibration, tiny, tiny_dir, tmp_path):
  cal, path = calibration
  with pytest.raises(ValueError, match="not on the other model.*calibrate this model"):
    cal.check_model("0123456789abcdef", "the other model")
  other, _ = tiny_dir("llama")
  lm2 = models.load(other, progress=False)
  with pytest.raises(ValueError, match="not on"):
    cal.check_model(calib.model_fingerprint(lm2.config, lm2.params))
  with pytest.raises(ValueError, match=r"calibration is for \[layers, kv heads, head dim\]"):
    cal.check_shapes(3, 2, 16)
  with pytest.raises(FileNotFoundError, match="calibrate_kvquant"):
    calib.load(str(tmp_path / "missing"))
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "x").write_text("not a checkpoint")
  with pytest.raises(ValueError, match="not a readable KVQuant calibration"):
    calib.load(str(tmp_path / "junk"))
  with pytest.raises(ValueError, match="no 8-bit datatype"):
    cal.lut("k", 8)
  with pytest.raises(ValueError, match="unsupported bit width 5"):
    KVQuant(bits=5)


def _prefill(m, prompts, method, chunk=16):
  tokens, lengths = gen.pad_batch(prompts, chunk)
  cache = m.new_cache(len(prompts), tokens.shape[1])
  logits, cache, obs = gen.prefill(m.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                                   apply_fn=m.apply_fn, chunk_size=chunk, observe=method.observe)
  return logits, cache, obs


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kvquant_cache_decodes_close_to_the_full_cache(tiny, calibration, bits):
  """Ragged batch; 4-bit tracks the full cache's logits closely, 2-bit less so, and the decode
  loop streams decoded tokens into the store (group 16)."""
  _, path = calibration
  rng = np.random.RandomState(3)
  prompts = [rng.randint(0, 160, 70).tolist(), rng.randint(0, 160, 45).tolist()]
  m = methods.make(f"kvquant{'' if bits == 3 else bits}", calibration=path)
  assert m.bits == bits
  first, cache, obs = _prefill(tiny, prompts, m)
  q = methods.compress(m, cache, obs, extra=40)
  # every token is quantized but the attention sink (position 0), kept in full precision
  assert int(q.quant.lengths[0, 0, 0]) == 69 and int(q.quant.lengths[0, 1, 0]) == 44
  assert int(q.lengths.max()) == 1 and int(q.positions[0, 0, 0, 0]) == 0
  full = cache.resize(cache.capacity + 40)
  steps = 20
  toks_f, _, _ = gen.decode_loop(tiny.params, jax.tree.map(jnp.copy, full), first,
                                 jax.random.PRNGKey(0),
                                 apply_fn=tiny.apply_fn, max_new_tokens=steps)
  # teacher-force the full cache's tokens through the quantized cache, compare logits
  lf, lq, cf, cq = [], [], full, q
  for i in range(steps):
    a, cf = gen.decode_step(tiny.params, toks_f[:, i], cf, apply_fn=tiny.apply_fn)
    b, cq = gen.decode_step(tiny.params, toks_f[:, i], cq, apply_fn=tiny.apply_fn)
    lf.append(np.asarray(a)), lq.append(np.asarray(b))
  pf = jax.nn.softmax(jnp.asarray(np.stack(lf)), -1)
  kl = float(jnp.sum(pf * (jnp.log(pf) - jax.nn.log_softmax(jnp.asarray(np.stack(lq)), -1)), -1)
             .mean())
  assert kl < {2: 0.5, 3: 0.1, 4: 0.03}[bits]
  assert int(cq.quant.lengths[0, 0, 0]) == 69 + 16  # one group of decoded tokens flushed
  assert int(cq.lengths[0, 0, 0]) == 1 + steps - 16  # the sink stays
  assert int(cq.positions[0, 0, 0, 0]) == 0
  assert cq.trimmed().nbytes < 0.5 * cf.trimmed().nbytes


def test_kvquant_composes_after_eviction(tiny, calibration):
  _, path = calibration
  m = methods.make("snapkv+kvquant", ratio=0.5, calibration=path)
  prompts = [np.random.RandomState(4).randint(0, 160, 64).tolist()]
  _, cache, obs = _prefill(tiny, prompts, m)
  out = methods.compress(m, cache, obs, extra=8)
  assert (np.asarray(out.quant.lengths + out.lengths) == 32).all() and out.quant.k_bits == 3
  with pytest.raises(ValueError, match="must come last"):
    methods.make("kvquant+snapkv", ratio=0.5)
  alone = methods.compress(KVQuant(calibration=path, sink=0), cache, None)  # no observations
  assert int(alone.quant.lengths.max()) == 64 and int(alone.lengths.max()) == 0
  with pytest.raises(ValueError, match="sink"):
    KVQuant(sink=-1)
  with pytest.raises(ValueError, match="keeps every token"):
    methods.make("kvquant", ratio=0.5)


@pytest.mark.parametrize("room", [0, 19])
def test_kvquant_free_slots_are_exactly_usable(tiny, calibration, room):
  """Capacity safety on KVQuant's store (issue 33; tests/test_capacity.py covers the others):
  decoding ``free_slots() + 1`` tokens keeps every position once (the sink stays in the window,
  decoded groups stream into the store); one more token is refused before any work."""
  _, path = calibration
  prompts = [np.random.RandomState(8).randint(0, 160, n).tolist() for n in (70, 45)]
  m = methods.make("kvquant4", calibration=path)
  first, cache, obs = _prefill(tiny, prompts, m)
  q = methods.compress(m, cache, obs, extra=room)
  free = q.free_slots()
  assert free >= room
  held = lambda c, i: np.concatenate([np.asarray(c.quant.positions)[i][: int(c.quant.lengths[i])],
                                      np.asarray(c.positions)[i][: int(c.lengths[i])]])
  before = {i: held(q, i) for i in np.ndindex(*q.lengths.shape)}
  with pytest.raises(ValueError, match=f"{free} free slots.*decoding {free + 2} tokens"):
    gen.decode_loop(tiny.params, q, first, jax.random.PRNGKey(0), apply_fn=tiny.apply_fn,
                    max_new_tokens=free + 2)
  _, n, out = gen.decode_loop(tiny.params, q, first, jax.random.PRNGKey(0),
                              apply_fn=tiny.apply_fn, max_new_tokens=free + 1)
  assert (np.asarray(n) == free + 1).all()
  for i, old in before.items():
    start = len(prompts[i[1]])
    np.testing.assert_array_equal(np.sort(held(out, i)),
                                  np.sort(np.concatenate([old, np.arange(start, start + free)])))


def test_kvquant_quantizes_a_cache_compressed_during_prefill(tiny, calibration):
  from kvlab.lib.online import prefill_context_compressing  # pylint: disable=g-import-not-at-top
  _, path = calibration
  c = tiny.config
  ctx = [np.random.RandomState(6).randint(0, 160, n).tolist() for n in (80, 50)]
  m = methods.make("knorm+kvquant4", ratio=0.25, calibration=path)
  cache, _, peak = prefill_context_compressing(tiny.params, tiny.apply_fn, ctx, m,
                                         num_layers=c.num_layers, kv_heads=c.num_kv_heads,
                                         head_dim=c.head_dim, chunk_size=16)
  assert cache.quant is not None and cache.quant.k_bits == 4 and cache.nbytes < peak
  both = np.asarray(cache.quant.lengths + cache.lengths)
  assert (both[:, 0] == 20).all() and (both[:, 1] == 13).all()  # 25 % kept, sinks in fp


@pytest.mark.slow
def test_committed_calibration_fits_the_default_model(default_model):
  """results/calibration/kvquant_smollm2-135m is SmolLM2's: accepted for it, refused for a
  different model; its 3-bit LUTs are sorted and spread over [-1, 1]."""
  m = methods.make("snapkv+kvquant", ratio=0.5)
  methods.check_for_model(m, default_model.config, default_model.params)
  cal = m.methods[-1].load_calibration()
  lut = cal.lut("k", 3)
  assert lut.shape == (30, 8) and (np.diff(lut, axis=-1) > 0).all()
  assert lut.min() < -0.5 and lut.max() > 0.5 and cal.meta["n_samples"] == 16
  other = jax.tree.map(lambda x: x, default_model.params)
  other["embed"] = other["embed"] * 1.01
  with pytest.raises(ValueError, match="not on"):
    methods.check_for_model(m, default_model.config, other)
