"""Low-rank and structural methods in the one cache pytree: xKV (cross-layer SVD), ThinK (key
channel pruning)."""

import jax.numpy as jnp
import numpy as np
import pytest

from kvlab import models
from kvlab.lib import methods
from kvlab.lib.lowrank.store import factor
from kvlab.lib.methods.xkv import XKV
from compressed_run import run_compressed


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  path, _ = tiny_dir("llama")  # 3 layers, 2 kv heads, head dim 16
  return models.load(path, progress=False, attn_block_size=8)


def test_factor_is_exact_at_full_rank_and_error_falls_with_rank():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 40, 3, 24) @ np.diag(np.linspace(3, 0.1, 24)), jnp.float32)
  valid = jnp.asarray(np.arange(40)[None] < np.array([[40], [31]]))
  errs = []
  for r in (2, 8, 24, 72):
    coef, basis = factor(x, valid, r)
    back = jnp.einsum("BQR,GBRF->BQGF", coef, basis)
    want = jnp.where(valid[..., None, None], x, 0)
    errs.append(float(jnp.linalg.norm(back - want) / jnp.linalg.norm(want)))
  assert errs[-1] < 1e-5 and all(a > b for a, b in zip(errs, errs[1:]))


def _run(tiny, method, prompts, steps=12):
  return run_compressed(tiny, method, prompts, steps)[:3]


def test_full_rank_equals_the_uncompressed_model(tiny):
  rng = np.random.RandomState(1)
  prompts = [rng.randint(0, 160, 60).tolist(), rng.randint(0, 160, 37).tolist()]
  full_t, full_l, _ = _run(tiny, methods.make("streaming_llm", ratio=1.0), prompts)
  # 1 layer per group, rank = K * H: exact up to float error
  t, l, small = _run(tiny, XKV(layers_per_group=1, rank_k=1.0, rank_v=1.0), prompts)
  np.testing.assert_array_equal(t, full_t)
  np.testing.assert_allclose(l, full_l, rtol=1e-3, atol=1e-3)
  assert small.quant.k_coef.shape[-1] == 32 and int(small.lengths.max()) == 0


def test_logit_error_falls_with_rank_and_bytes_show(tiny):
  rng = np.random.RandomState(2)
  prompts = [rng.randint(0, 160, 64).tolist()]
  _, full_l, full = _run(tiny, methods.make("streaming_llm", ratio=1.0), prompts, steps=2)
  errs, sizes = [], []
  for r in (4, 48, 96):  # groups of 3 layers: 96 features; each rank compiles afresh
    _, l, small = _run(tiny, XKV(layers_per_group=3, rank_k=r, rank_v=r), prompts, steps=2)
    errs.append(float(np.abs(l - full_l).max()))
    sizes.append(small.trimmed().nbytes)
  assert errs[-1] < 1e-3 and all(a > b for a, b in zip(errs, errs[1:])), errs
  assert sizes[0] < 0.3 * full.trimmed().nbytes and sizes == sorted(sizes)


def test_errors(tiny):
  rng = np.random.RandomState(3)
  prompts = [rng.randint(0, 160, 64).tolist()]
  # 3 layers in groups of 2: the last group holds one layer; still exact at full rank
  full_t, full_l, _ = _run(tiny, methods.make("streaming_llm", ratio=1.0), prompts, steps=2)
  t, l, _ = _run(tiny, XKV(layers_per_group=2, rank_k=1.0, rank_v=1.0), prompts, steps=2)
  np.testing.assert_allclose(l, full_l, rtol=1e-3, atol=1e-3)
  with pytest.raises(ValueError, match="same tokens in every layer and head"):
    _run(tiny, methods.make("snapkv+xkv", ratio=0.75, layers_per_group=1), prompts)
  with pytest.raises(ValueError, match="must come last"):
    methods.make("xkv+snapkv", ratio=0.5)
  with pytest.raises(ValueError, match="ranks must be positive"):
    XKV(rank_k=0)


def test_think_without_pruning_equals_the_uncompressed_model(tiny):
  rng = np.random.RandomState(4)
  prompts = [rng.randint(0, 160, 70).tolist(), rng.randint(0, 160, 41).tolist()]
  full_t, full_l, _ = _run(tiny, methods.make("streaming_llm", ratio=1.0), prompts)
  t, l, small = _run(tiny, methods.ThinK(pruning=0.0, window=8, recent=8), prompts)
  np.testing.assert_array_equal(t, full_t)
  np.testing.assert_allclose(l, full_l, rtol=1e-4, atol=1e-4)
  assert int(small.quant.lengths[0, 0, 0]) == 62 and int(small.lengths[0, 1, 0]) == 8


def test_think_error_falls_with_less_pruning_and_composes_after_eviction(tiny):
  rng = np.random.RandomState(5)
  prompts = [rng.randint(0, 160, 80).tolist()]
  _, full_l, full = _run(tiny, methods.make("streaming_llm", ratio=1.0), prompts, steps=2)
  errs, rec, sizes = [], [], []
  keys = np.asarray(full.keys)[:, :, :, :72]  # the 72 pruned slots (80 - recent 8)
  for p in (0.75, 0.25, 0.0):  # each pruning level compiles afresh
    _, l, small = _run(tiny, methods.ThinK(pruning=p, window=8, recent=8), prompts, steps=2)
    errs.append(float(np.abs(l - full_l).max()))
    sizes.append(small.trimmed().nbytes)
    assert small.quant.keys.shape[-1] == 16 - int(np.floor(p * 16))
    back = np.stack([np.asarray(small.quant.read(i, 0, 72)[0]) for i in range(3)])
    rec.append(float(np.linalg.norm(back - keys) / np.linalg.norm(keys)))
  # kept channel sets are nested, so the key reconstruction error falls strictly with pruning
  assert rec[-1] < 1e-6 and all(a > b for a, b in zip(rec, rec[1:])), rec
  assert errs[-1] < 1e-4 and errs[1] < errs[0], errs  # logits: exact without pruning
  assert sizes == sorted(sizes)
  m = methods.make("snapkv+think", ratio=0.5, window=8, recent=8)
  _, _, small = _run(tiny, m, prompts, steps=2)
  assert (np.asarray(small.quant.lengths + small.lengths) == 40).all()
  _, _, evicted = _run(tiny, methods.make("snapkv", ratio=0.5, window=8), prompts, steps=2)
  assert small.trimmed().nbytes < 0.9 * evicted.trimmed().nbytes  # pruned channels saved
  with pytest.raises(ValueError, match="already has a stored part \\(ChannelStore\\)"):
    methods.compress(methods.make("xkv"), small, None)
  with pytest.raises(ValueError, match="pruning is the fraction"):
    methods.ThinK(pruning=1.0)
