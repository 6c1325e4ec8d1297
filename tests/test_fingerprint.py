"""Model fingerprints over every weight: layer weights count, the load dtype does not, the old
embedding-slice format is refused, mismatch errors name both models."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kvlab import models
from kvlab.lib import methods
from kvlab.lib.lowrank import matryoshka as mk
from kvlab.lib.quant import kvquant_calibrate as calib
from kvlab.lib.quant.kvquant_calibrate import model_fingerprint  # the name call sites import
from tiny_checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def twins(tiny_dir, tmp_path_factory):
  """Two tiny Llamas with the same embedding and different layer weights."""
  path_a, torch_a = tiny_dir("llama")
  path_b = str(tmp_path_factory.mktemp("twin") / "llama_b")
  torch_b = make_checkpoint("llama", path_b, seed=1)
  with torch.no_grad():
    torch_b.model.embed_tokens.weight.copy_(torch_a.model.embed_tokens.weight)
  torch_b.save_pretrained(path_b, safe_serialization=True)
  return (models.load(path_a, progress=False, attn_block_size=8),
          models.load(path_b, progress=False, attn_block_size=8))


def test_layer_weights_change_the_fingerprint_and_artifacts_are_refused(twins, tmp_path):
  a, b = twins
  np.testing.assert_array_equal(a.params["embed"], b.params["embed"])
  assert model_fingerprint(a.config, a.params) != model_fingerprint(b.config, b.params)
  assert a.fingerprint == model_fingerprint(a.config, a.params)
  rng = np.random.RandomState(0)
  samples = [rng.randint(0, 160, 32).tolist() for _ in range(2)]
  p = mk.pca(mk.kv_moments(a, samples), "tiny-a", a.fingerprint, a.source)
  saved = mk.save(p, str(tmp_path / "pca"))
  m = methods.MatryoshkaPCA(projections=saved)
  methods.check_for_model(m, a.config, a.params, f"tiny-a ({a.source})")
  with pytest.raises(ValueError) as e:
    methods.check_for_model(m, b.config, b.params, f"tiny-b ({b.source})")
  assert a.source in str(e.value) and b.source in str(e.value)
  cal = calib.Calibration(np.zeros((3, 2, 16)), np.ones((3, 2, 16)), np.ones(8), {},
                          {"model": "tiny-a", "source": a.source, "fingerprint": a.fingerprint})
  cal.check_model(a.fingerprint)
  with pytest.raises(ValueError, match="not on tiny-b") as e:
    cal.check_model(b.fingerprint, f"tiny-b ({b.source})")
  assert a.source in str(e.value) and b.source in str(e.value)


def test_float32_and_bfloat16_loads_agree(tiny_dir, tmp_path):
  path, _ = tiny_dir("llama")
  f32 = models.load(path, progress=False)
  bf16 = models.load(path, dtype=jnp.bfloat16, progress=False)
  assert bf16.params["layers"]["wq"].dtype == jnp.bfloat16
  assert model_fingerprint(f32.config, f32.params) == model_fingerprint(bf16.config, bf16.params)
  assert f32.fingerprint == bf16.fingerprint
  # an artifact made on the float32 load is accepted on the bfloat16 one
  p = mk.pca(mk.kv_moments(f32, [list(range(3, 35))]), "tiny", f32.fingerprint, f32.source)
  p.check_model(bf16.fingerprint, 3, 2, 16)
  # one changed weight in one layer changes it
  other = jax.tree.map(lambda x: x, f32.params)
  other["layers"]["w_down"] = other["layers"]["w_down"].at[2, 0, 0].add(0.5)
  assert model_fingerprint(f32.config, other) != f32.fingerprint


def test_old_format_fingerprints_are_refused():
  old = "71ac74840a599dfe"  # the old format: config + a 4 x 32 slice of the embedding
  cal = calib.Calibration(np.zeros((3, 2, 16)), np.ones((3, 2, 16)), np.ones(8), {},
                          {"model": "smollm2-135m", "fingerprint": old})
  with pytest.raises(ValueError, match="old format.*re-calibrate.*calibrate_kvquant"):
    cal.check_model("w1-" + "0" * 20, "tiny (/x)")
  p = mk.Projections(np.zeros((3, 2, 16, 16)), np.zeros((3, 2, 16)), np.zeros((3, 2, 16, 16)),
                     np.zeros((3, 2, 16)), {"model": "smollm2-135m", "model_fingerprint": old})
  with pytest.raises(ValueError, match="old format.*re-calibrate.*train_matryoshka"):
    p.check_model("w1-" + "0" * 20, 3, 2, 16)


def test_fingerprint_is_computed_once_per_params_tree(tiny_dir):
  from kvlab.lib import fingerprint as fpm  # pylint: disable=g-import-not-at-top
  path, _ = tiny_dir("llama")
  lm = models.load(path, progress=False)
  fp = lm.fingerprint
  calls = []
  real = fpm._compute  # pylint: disable=protected-access
  fpm._compute = lambda *a: calls.append(1) or real(*a)  # pylint: disable=protected-access
  try:
    assert lm.fingerprint == fp and model_fingerprint(lm.config, lm.params) == fp and not calls
    copy = jax.tree.map(lambda x: x + 0, lm.params)  # new leaves, same values: hashed again
    assert model_fingerprint(lm.config, copy) == fp and len(calls) == 1
    del copy
    gc.collect()
    fresh = jax.tree.map(lambda x: x * 2, lm.params)  # may reuse the freed ids: no stale hit
    assert model_fingerprint(lm.config, fresh) != fp and len(calls) == 2
  finally:
    fpm._compute = real  # pylint: disable=protected-access
