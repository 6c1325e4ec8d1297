"""MatryoshkaKV: Cayley bases, PCA projections in the cache, distillation that resumes exactly."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvlab import models
from kvlab.lib import methods
from kvlab.lib.lowrank import matryoshka as mk
from kvlab.lib.lowrank import matryoshka_train as mt
from kvlab.lib.lowrank.projected import flat_offsets, layer_widths
from kvlab.lib.quant.kvquant_calibrate import model_fingerprint
from compressed_run import run_compressed
from xla_env import with_host_devices


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  path, _ = tiny_dir("llama")  # 3 layers, 2 kv heads, head dim 16
  return models.load(path, progress=False, attn_block_size=8)


@pytest.fixture(scope="module")
def pca_dir(tiny, tmp_path_factory):
  rng = np.random.RandomState(0)
  samples = [rng.randint(0, 160, 48).tolist() for _ in range(4)]
  p = mk.pca(mk.kv_moments(tiny, samples), "tiny", model_fingerprint(tiny.config, tiny.params))
  return mk.save(p, str(tmp_path_factory.mktemp("mk") / "pca"))


def test_cayley_bases_are_orthogonal_and_start_at_pca():
  rng = np.random.RandomState(0)
  u0 = jnp.asarray(np.linalg.qr(rng.randn(3, 8, 8))[0], jnp.float32)
  x = jnp.asarray(rng.randn(3, 8, 8), jnp.float32)
  u = mk.orthogonal(u0, x)
  np.testing.assert_allclose(np.einsum("bij,bik->bjk", u, u), np.broadcast_to(np.eye(8), u.shape),
                             atol=1e-5)
  np.testing.assert_allclose(mk.orthogonal(u0, jnp.zeros_like(x)), u0, atol=1e-6)
  a = x - jnp.swapaxes(x, -1, -2)
  eye = jnp.eye(8)
  np.testing.assert_allclose(mk.cayley(x), np.linalg.solve(eye - a / 2, eye + a / 2), atol=1e-5)
  p = mk.projector(u, mk.rank_mask(jnp.array([8, 8, 8]), 8))
  np.testing.assert_allclose(p, np.broadcast_to(np.eye(8), p.shape), atol=1e-5)


def _run(tiny, method, prompts, steps=8):
  return run_compressed(tiny, method, prompts, steps)


def test_full_rank_equals_the_uncompressed_model_and_error_falls_with_rank(tiny, pca_dir):
  rng = np.random.RandomState(1)
  prompts = [rng.randint(0, 160, 60).tolist(), rng.randint(0, 160, 37).tolist()]
  full_t, full_l, full, cache = _run(tiny, methods.make("streaming_llm", ratio=1.0), prompts)
  t, l, small, _ = _run(tiny, methods.MatryoshkaPCA(rank=1.0, projections=pca_dir), prompts)
  np.testing.assert_array_equal(t, full_t)
  np.testing.assert_allclose(l, full_l, rtol=1e-4, atol=1e-4)
  assert int(small.lengths.max()) == 0 and small.quant.k_coef.shape[-1] == 3 * 16
  rec, sizes = [], []
  keys = np.asarray(cache.keys)[:, :, :, :37]
  for r in (2, 8, 16):  # each rank is a fresh set of compiles
    _, _, small, _ = _run(tiny, methods.MatryoshkaPCA(rank=r, projections=pca_dir), prompts,
                          steps=1)
    back = np.stack([np.asarray(small.quant.read(i, 0, 37)[0]) for i in range(3)])
    rec.append(float(np.linalg.norm(back - keys) / np.linalg.norm(keys)))
    sizes.append(small.trimmed().nbytes)
  assert rec[-1] < 1e-5 and all(a > b for a, b in zip(rec, rec[1:])), rec
  assert sizes == sorted(sizes) and sizes[1] < 0.6 * sizes[-1]  # half the rank, ~half the bytes


def test_composes_after_eviction_and_bad_input(tiny, pca_dir, tmp_path):
  rng = np.random.RandomState(2)
  prompts = [rng.randint(0, 160, 64).tolist()]
  m = methods.make("snapkv+matryoshka_pca", ratio=0.5, window=8, rank=0.5, projections=pca_dir)
  _, _, small, _ = _run(tiny, m, prompts, steps=2)
  assert (np.asarray(small.quant.lengths) == 32).all() and small.quant.k_coef.shape[-1] == 3 * 8
  own = methods.make(f"snapkv+matryoshka_pca:rank=0.25:projections={pca_dir}", ratio=0.5)
  assert own.methods[1].rank == 0.25 and own.methods[0].ratio == 0.5
  _, _, small, _ = _run(tiny, own, prompts, steps=1)
  assert small.quant.k_coef.shape[-1] == 3 * 4
  with pytest.raises(ValueError, match="does not take \\['window'\\]"):
    methods.make("matryoshka:window=3")
  with pytest.raises(ValueError, match="write name:key=value"):
    methods.make("matryoshka:rank")
  with pytest.raises(ValueError, match="rank must be"):
    methods.MatryoshkaKV(rank=0)
  with pytest.raises(ValueError, match="gives 20 of head dim 16"):
    _run(tiny, methods.MatryoshkaPCA(rank=20, projections=pca_dir), prompts)
  with pytest.raises(FileNotFoundError, match="train_matryoshka"):
    methods.MatryoshkaKV(projections=str(tmp_path / "none")).load_projections()
  with pytest.raises(ValueError, match="holds no searched ranks"):
    _run(tiny, methods.MatryoshkaPCA(projections=pca_dir, searched=True), prompts)
  other = mk.load(pca_dir)
  with pytest.raises(ValueError, match="made for model"):
    other.check_model("0" * 16, 3, 2, 16)
  with pytest.raises(ValueError, match="has \\(30, 3, 64\\)"):
    other.check_model(other.meta["model_fingerprint"], 30, 3, 64)


def test_training_lowers_the_loss_and_resumes_exactly(tiny, pca_dir, tmp_path):
  pca = mk.load(pca_dir)
  pool = np.random.RandomState(3).randint(0, 160, 2000).astype(np.int32)
  cfg = mt.TrainConfig(steps=6, batch=2, seqlen=32, lr=3e-2, warmup=1, rank_step=4,
                       save_every=2)
  theta, full_run = mt.train(tiny, pca, pool, cfg, str(tmp_path / "a"))
  # killed after 3 steps (last checkpoint at 2), then restarted with the same command
  _, first = mt.train(tiny, pca, pool, cfg, str(tmp_path / "b"), stop_after=3)
  _, rest = mt.train(tiny, pca, pool, cfg, str(tmp_path / "b"))
  assert len(first) == 3 and [r["step"] for r in rest] == [3, 4, 5, 6]
  np.testing.assert_allclose([r["loss"] for r in rest], [r["loss"] for r in full_run[2:]],
                             rtol=1e-6)
  with open(tmp_path / "b" / "metrics.jsonl") as f:
    assert [json.loads(r)["step"] for r in f] == [1, 2, 3, 4, 5, 6]
  # trained bases stay orthogonal and lower the held-out distillation loss at half rank
  u_k, _ = mt.bases(pca, theta)
  np.testing.assert_allclose(np.einsum("abij,abik->abjk", u_k, u_k),
                             np.broadcast_to(np.eye(16), u_k.shape), atol=1e-4)
  held = mt.windows_of(pool[1000:], 2, 32)
  before = mt.evaluate(tiny, pca, mt.init_theta(pca), held, 8)
  after = mt.evaluate(tiny, pca, theta, held, 8)
  assert after["kl"] < before["kl"], (before, after)
  saved = mk.save(mt.to_projections(pca, theta, {}), str(tmp_path / "trained"))
  _run(tiny, methods.MatryoshkaKV(rank=0.5, projections=saved), [pool[:40].tolist()], steps=1)
  assert os.path.isdir(saved)


def test_rank_search_meets_the_budget_and_spends_rank_where_it_matters(tiny, pca_dir):
  from kvlab.lib.lowrank import matryoshka_search as ms
  # made-up sensitivities: head (keys, layer 0, head 1) is 10x more sensitive than the rest
  grid_err = np.array([3.0, 2.0, 1.0, 0.0])  # ranks 4, 8, 12, 16
  err = np.broadcast_to(grid_err, (2, 3, 2, 4)).copy()
  err[0, 0, 1] *= 10
  ranks = ms.greedy_ranks(err, 4, 16, 0.5)
  assert ranks.mean() <= 8 and ranks[0, 0, 1] == 16, ranks
  per_layer = ms.greedy_ranks(err, 4, 16, 0.5, per_layer=True)
  assert (per_layer == per_layer[:, :, :1]).all() and per_layer.mean() <= 8
  assert per_layer[0, 0, 0] > per_layer[0, 1, 0]  # the layer holding the sensitive head keeps more
  with pytest.raises(ValueError, match="budget is the mean kept fraction"):
    ms.greedy_ranks(err, 4, 16, 0.0)
  p = mk.load(pca_dir)
  windows = np.random.RandomState(5).randint(0, 160, (1, 24))
  real = ms.sensitivities(tiny, p, windows, 8)  # grid 8, 16
  assert real.shape == (2, 3, 2, 2) and (real[..., 0] > 0).all() and (real[..., 1] == 0).all()
  p.ranks = ms.greedy_ranks(real, 8, 16, 0.75)
  p.meta["search_budget"] = 0.75
  assert p.ranks.mean() <= 12
  saved = mk.save(p, pca_dir + "_searched")
  m = methods.MatryoshkaPCA(rank=0.75, projections=saved, searched=True)
  np.testing.assert_array_equal(m.ranks(3, 2, 16), p.ranks)
  _, _, small, _ = _run(tiny, m, [windows[0].tolist()], steps=1)
  widths = layer_widths(p.ranks[0])  # each layer stores its own width on the flat axis
  assert small.quant.k_coef.shape[-1] == flat_offsets(widths)[1] < 3 * int(p.ranks.max()) + 1
  from kvlab.lib import cache_io  # a saved cache keeps the flat layout's offsets and reads the same
  cache_io.save_cache(small, pca_dir + "_cache")
  back, _ = cache_io.load_cache(pca_dir + "_cache")
  assert back.quant.k_offsets == small.quant.k_offsets
  read = jax.jit(lambda s, layer: s.read(layer, 0, 16)[0])
  for layer in range(3):
    np.testing.assert_array_equal(read(back.quant, layer), read(small.quant, layer))
  with pytest.raises(ValueError, match="searched for a mean rank of 0.75"):
    methods.MatryoshkaPCA(rank=0.5, projections=saved, searched=True).ranks(3, 2, 16)


def test_data_parallel_training_matches_one_device(tmp_path):
  import subprocess
  import sys
  script = os.path.join(os.path.dirname(__file__), "matryoshka_dp_run.py")
  env = with_host_devices(8)
  losses = {}
  for mesh in ("one", "data:8"):
    out = tmp_path / f"{mesh.replace(':', '')}.json"
    proc = subprocess.run([sys.executable, script, str(out), mesh], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses[mesh] = json.loads(out.read_text())
  assert len(losses["one"]) == 4
  np.testing.assert_allclose(losses["data:8"], losses["one"], rtol=1e-5)


def test_flat_layout_reads_each_layer_at_its_own_width():
  from kvlab.lib.lowrank.projected import ProjectedStore, flatten
  rng = np.random.RandomState(7)
  l, b, k, q, h = 3, 2, 2, 8, 8
  widths = (2, 8, 5)
  u = np.linalg.qr(rng.randn(l, k, h, h))[0].astype(np.float32)
  ranks = np.array([[2, 1], [8, 3], [5, 5]])
  basis = u * (np.arange(h) < ranks[..., None])[:, :, None, :]
  x = rng.randn(l, b, k, q, h).astype(np.float32)
  coef = jnp.einsum("LBKQH,LKHR->LBKQR", x, basis)
  offsets, total = flat_offsets(widths)
  assert offsets == (0, 2, 10) and total == 18  # the 8-wide read of layer 2 stays inside
  store = ProjectedStore(k_coef=flatten(coef, widths), k_basis=jnp.asarray(basis),
                         k_mean=jnp.zeros((l, k, h)), v_coef=flatten(coef, widths),
                         v_basis=jnp.asarray(basis), v_mean=jnp.zeros((l, k, h)),
                         positions=jnp.zeros((l, b, k, q), jnp.int32),
                         lengths=jnp.full((l, b, k), q, jnp.int32), k_offsets=offsets,
                         v_offsets=offsets)
  for layer in range(l):
    keys, _, _ = store.read(jnp.int32(layer), 0, q)
    want = np.einsum("BKQR,KHR->BKQH", np.asarray(coef[layer]), basis[layer])
    np.testing.assert_allclose(keys, want, atol=1e-5)
