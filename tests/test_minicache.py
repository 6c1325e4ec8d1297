"""MiniCache: adjacent layer pairs merged (SLERP direction, per-layer norms, retained tokens)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvlab import models
from kvlab.lib import cache_io
from kvlab.lib import methods
from kvlab.lib.cache import KVCache
from kvlab.lib.lowrank.merged import MergedStore
from kvlab.lib.methods.minicache import MiniCache
from compressed_run import run_compressed


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  path, _ = tiny_dir("llama")  # 3 layers, 2 kv heads, head dim 16
  return models.load(path, progress=False, attn_block_size=8)


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.RandomState(1)
  return [rng.randint(0, 160, 60).tolist(), rng.randint(0, 160, 37).tolist()]


@pytest.fixture(scope="module")
def full(tiny, prompts):
  """The uncompressed run: ``(tokens, logits, cache)``."""
  return _run(tiny, methods.make("streaming_llm", ratio=1.0), prompts)


def _run(tiny, method, prompts, steps=4):
  return run_compressed(tiny, method, prompts, steps)[:3]


def _cache(layers=3, same=False, seed=0):
  """Random cache ``[L, 2, 2, 40, 16]``; row 0 holds 30 tokens, row 1 all 40. ``same``: every
  layer's vectors are a positive multiple of layer 0's (same directions, other norms)."""
  rng = np.random.RandomState(seed)
  shape = (layers, 2, 2, 40, 16)
  lengths = np.broadcast_to(np.array([30, 40])[None, :, None], shape[:3]).astype(np.int32)
  pos = np.where(np.arange(40) < lengths[..., None], np.arange(40), -1).astype(np.int32)
  k, v = rng.randn(*shape), rng.randn(*shape)
  if same:
    scale = rng.uniform(0.5, 2.0, shape[:4] + (1,))
    k, v = k[:1] * scale, v[:1] * scale
  return KVCache(keys=jnp.asarray(k, jnp.float32), values=jnp.asarray(v, jnp.float32),
                 positions=jnp.asarray(pos), lengths=jnp.asarray(lengths),
                 next_position=jnp.asarray(lengths[0, :, 0]))


def _read_all(store, layers):
  """Every layer's ``(keys, values) [L, B, K, 40, H]`` via ``read`` with a traced layer."""
  read = jax.jit(lambda l: store.read(l, 0, 64))
  out = [read(jnp.int32(l)) for l in range(layers)]
  return (np.stack([np.asarray(o[0])[:, :, :40] for o in out]),
          np.stack([np.asarray(o[1])[:, :, :40] for o in out]))


def _valid(cache):
  return np.asarray(cache.positions) >= 0  # [L, B, K, 40]


def test_nothing_merged_or_all_retained_equals_the_uncompressed_model(tiny, prompts, full):
  full_t, full_l, _ = full
  for m in (MiniCache(start=0.9), MiniCache(start=0.0, retain=1.0)):
    t, l, small = _run(tiny, m, prompts)
    np.testing.assert_array_equal(t, full_t)
    np.testing.assert_allclose(l, full_l, rtol=1e-5, atol=1e-5)
    assert isinstance(small.quant, MergedStore) and int(small.lengths.max()) == 0
  assert small.quant.pairs == 1 and small.quant.keys.shape[0] == 1  # layers 0+1 merged, 2 not


def test_read_keeps_norms_and_slerp_direction_and_identical_layers_merge_exactly():
  c = _cache(layers=2)
  t = 0.6
  store = MiniCache(start=0.0, t=t, retain=0.0).apply(c).quant
  keys, values = _read_all(store, 2)
  valid = _valid(c)
  for got, orig in ((keys, np.asarray(c.keys)), (values, np.asarray(c.values))):
    got, orig = got[:, valid[0]], orig[:, valid[0]]  # [2, tokens, H]
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(orig, axis=-1),
                               rtol=1e-5)
    u1, u2, e, e2 = (x / np.linalg.norm(x, axis=-1, keepdims=True)
                     for x in (orig[0], orig[1], got[0], got[1]))
    np.testing.assert_allclose(e2, e, atol=1e-5)  # one shared direction
    # SLERP: e lies between u1 and u2, at t of their angle from u1
    angle = lambda a, b: np.arccos(np.clip((a * b).sum(-1), -1, 1))
    om = angle(u1, u2)
    np.testing.assert_allclose(angle(u1, e), t * om, atol=1e-3)
    np.testing.assert_allclose(angle(e, u2), (1 - t) * om, atol=1e-3)
    assert np.abs(got[0] - orig[0]).max() > 0.1  # it really merged
  # a block read at an offset matches the full read (retained slots land in the right block)
  store = MiniCache(start=0.0, retain=0.3).apply(c).quant
  keys, _ = _read_all(store, 2)
  blk = np.asarray(store.read(1, 16, 8)[0])
  np.testing.assert_allclose(blk, keys[1][:, :, 16:24], atol=1e-6)
  # the same directions in both layers (any norms): the merge is exact
  same = _cache(layers=2, same=True)
  keys, values = _read_all(MiniCache(start=0.0, retain=0.0).apply(same).quant, 2)
  valid = _valid(same)
  np.testing.assert_allclose(keys[valid], np.asarray(same.keys)[valid], atol=1e-5)
  np.testing.assert_allclose(values[valid], np.asarray(same.values)[valid], atol=1e-5)


def test_retained_tokens_are_the_most_divergent_and_error_falls_with_retain():
  c = _cache(layers=3)  # start 0: layers 0+1 merged, layer 2 kept whole
  valid = _valid(c)
  orig_k, orig_v = np.asarray(c.keys), np.asarray(c.values)
  errs = []
  for r in (0.0, 0.1, 0.3, 1.0):
    small = MiniCache(start=0.0, retain=r).apply(c)
    keys, values = _read_all(small.quant, 3)
    np.testing.assert_array_equal(keys[2][valid[2]], orig_k[2][valid[2]])  # unmerged: as is
    err = lambda a, b: np.linalg.norm((a - b)[valid[:2]]) / np.linalg.norm(b[valid[:2]])
    errs.append(err(keys[:2], orig_k[:2]) + err(values[:2], orig_v[:2]))
    if r == 0.1:  # ceil(0.1 * 40) = 4 tokens per (row, head): the 4 largest angles
      u = orig_k[:2] / np.linalg.norm(orig_k[:2], axis=-1, keepdims=True)
      ang = np.where(valid[0], np.arccos(np.clip((u[0] * u[1]).sum(-1), -1, 1)), -1)
      want = np.sort(np.argsort(-ang, axis=-1)[..., :4], axis=-1)
      np.testing.assert_array_equal(np.sort(np.asarray(small.quant.k_index[0]), -1), want)
      hit = np.zeros(ang.shape, bool)
      np.put_along_axis(hit, want, True, axis=-1)
      np.testing.assert_array_equal(keys[:2][:, hit], orig_k[:2][:, hit])
  assert errs[-1] < 1e-6 and all(a > b for a, b in zip(errs, errs[1:])), errs


def test_merged_cache_stores_fewer_bytes(tiny, prompts, full):
  _, full_l, full_cache = full
  _, l, small = _run(tiny, MiniCache(start=0.0), prompts)
  assert np.isfinite(l).all() and np.abs(l - full_l).max() > 0  # merged, still runs
  q = small.quant  # 60 tokens: ceil(0.05 * 60) = 3 retained per (row, head)
  assert q.k_dir.shape == (1, 2, 2, 64, 16) and q.k_kept.shape == (2, 2, 2, 3, 16)
  # the merged pair: one direction + two norms + 5 % retained instead of two full vectors
  pair = sum(x.nbytes for x in (q.k_dir, q.k_norm, q.k_kept, q.k_index))
  assert pair < 0.65 * 2 * q.k_dir.nbytes
  assert small.trimmed().nbytes < full_cache.trimmed().nbytes


def test_bad_input_gives_clear_errors():
  with pytest.raises(ValueError, match="start is the fraction"):
    MiniCache(start=1.5)
  with pytest.raises(ValueError, match="retain is the fraction"):
    MiniCache(retain=-0.1)
  with pytest.raises(ValueError, match="t is the SLERP weight"):
    MiniCache(t=1.2)
  c = _cache(layers=2)
  scores = jnp.asarray(np.random.RandomState(3).rand(*c.positions.shape), jnp.float32)
  evicted = methods.select(c, scores, jnp.full(c.lengths.shape, 20, jnp.int32), 24)
  with pytest.raises(ValueError, match="same tokens in every layer and head"):
    MiniCache().apply(evicted)
  merged = MiniCache().apply(c)
  with pytest.raises(ValueError, match="already has a stored part \\(MergedStore\\)"):
    MiniCache().apply(merged)


def test_saved_merged_cache_loads_back_identical(tmp_path):
  c = _cache(layers=3)
  small = MiniCache(start=0.0, retain=0.1).apply(c, extra=4)
  cache_io.save_cache(small, str(tmp_path / "mc"), {"method": "minicache"})
  back, meta = cache_io.load_cache(str(tmp_path / "mc"))
  assert meta == {"method": "minicache"} and isinstance(back.quant, MergedStore)
  assert back.quant.first == 0 and back.nbytes == small.nbytes
  assert jax.tree.structure(back) == jax.tree.structure(small)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(small)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  np.testing.assert_array_equal(_read_all(back.quant, 3)[0], _read_all(small.quant, 3)[0])
