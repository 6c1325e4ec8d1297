"""Saved caches (dense, KIVI, KVQuant, xKV, ThinK) load back identical, also across meshes."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvlab.lib import cache_io, methods
from kvlab.lib.cache import KVCache
from kvlab.lib.methods.kivi import KIVI
from kvlab.lib.lowrank.channels import ChannelStore
from kvlab.lib.lowrank.store import LowRankStore
from kvlab.lib.quant.kvquant_store import KVQuantStore
from xla_env import with_host_devices


def _caches():
  rng = np.random.RandomState(0)
  shape = (2, 4, 2, 96, 32)  # [L, B, K, S, H]: batch 4 on data:4, kv heads 2 on model:2
  lengths = rng.randint(40, 96, size=shape[:3]).astype(np.int32)
  pos = np.where(np.arange(96) < lengths[..., None], np.arange(96), -1).astype(np.int32)
  dense = KVCache(keys=jnp.asarray(rng.randn(*shape), jnp.float32),
                  values=jnp.asarray(rng.randn(*shape), jnp.bfloat16), positions=jnp.asarray(pos),
                  lengths=jnp.asarray(lengths), next_position=jnp.asarray(lengths.max((0, 2))),
                  scores=jnp.asarray(rng.rand(*shape[:4]), jnp.float32))
  kivi = methods.compress(KIVI(bits=2, group=16, residual=16), dense.replace(scores=None),
                          extra=8)
  lut = jnp.asarray(np.tile(np.linspace(-1, 1, 8), (2, 1)), jnp.float32)
  store = KVQuantStore.build(dense.keys, dense.values, dense.positions, dense.lengths,
                             k_lut=lut, v_lut=lut, k_offset=jnp.zeros((2, 2, 32)),
                             k_range=jnp.full((2, 2, 32), 3.0),
                             inv_freq=jnp.linspace(1, 1e-3, 16), n_outliers=1)
  kvq = dense.replace(keys=dense.keys[:, :, :, :8], values=dense.values[:, :, :, :8],
                      positions=jnp.full(shape[:3] + (8,), -1), scores=None,
                      lengths=jnp.zeros(shape[:3], jnp.int32), quant=store)
  lowrank = kvq.replace(quant=LowRankStore(
      k_coef=jnp.asarray(rng.randn(1, 4, 96, 12), jnp.float32),
      k_basis=jnp.asarray(rng.randn(2, 4, 12, 64), jnp.float32),
      v_coef=jnp.asarray(rng.randn(1, 4, 96, 20), jnp.bfloat16),
      v_basis=jnp.asarray(rng.randn(2, 4, 20, 64), jnp.bfloat16), positions=dense.positions,
      lengths=dense.lengths, inv_freq=jnp.linspace(1, 1e-3, 16), layers_per_group=2))
  pruned = kvq.replace(quant=ChannelStore(
      keys=dense.keys[..., :20], channels=jnp.asarray(rng.randint(0, 32, (2, 4, 2, 20)), jnp.uint8),
      values=dense.values, positions=dense.positions, lengths=dense.lengths))
  return {"dense": dense, "kivi": kivi, "kvquant": kvq, "xkv": lowrank, "think": pruned}


def _same(a: KVCache, b: KVCache):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_on_one_device(tmp_path):
  for name, c in _caches().items():
    cache_io.save_cache(c, str(tmp_path / name), {"method": name})
    back, meta = cache_io.load_cache(str(tmp_path / name))
    _same(back, c)
    assert meta == {"method": name} and back.nbytes == c.nbytes


def test_saved_on_a_4x2_mesh_loads_on_one_device_and_back(tmp_path):
  src, dst = tmp_path / "one", tmp_path / "mesh"
  src.mkdir()
  dst.mkdir()
  caches = _caches()
  for name, c in caches.items():
    cache_io.save_cache(c, str(src / name), {"method": name})
  env = with_host_devices(8, JAX_PLATFORMS="cpu")
  script = os.path.join(os.path.dirname(__file__), "cache_io_run.py")
  proc = subprocess.run([sys.executable, script, str(src), str(dst), "data:4,model:2"],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name, c in caches.items():
    back, meta = cache_io.load_cache(str(dst / name))
    _same(back, c)
    assert meta["via"] == "data:4,model:2"


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no saved cache"):
    cache_io.load_cache(str(tmp_path / "nothing"))
  (tmp_path / "junk").mkdir()
  with pytest.raises(ValueError, match="not a readable saved cache"):
    cache_io.load_cache(str(tmp_path / "junk"))
