"""Compress during chunked prefill: bounded cache, exact where the method allows it."""

import jax.numpy as jnp
import numpy as np
import pytest

import models
from lib import generate as gen
from lib import methods
from lib.online import online_capacity, prefill_compressing


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  path, _ = tiny_dir("llama")
  return models.load(path, progress=False, attn_block_size=8)


def _online(m, prompts, method, chunk):
  tokens, lengths = gen.pad_batch(prompts, chunk)
  c = m.config
  cap, kept = online_capacity(method, lengths, chunk, c.num_layers, c.num_kv_heads)
  logits, cache = prefill_compressing(
      m.params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(kept, jnp.int32),
      apply_fn=m.apply_fn, chunk_size=chunk, method=method, capacity=cap,
      num_layers=c.num_layers, kv_heads=c.num_kv_heads, head_dim=c.head_dim)
  return logits, cache, kept


def _offline(m, prompts, method, chunk):
  tokens, lengths = gen.pad_batch(prompts, chunk)
  cache = m.new_cache(len(prompts), tokens.shape[1])
  logits, cache, obs = gen.prefill(m.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                                   apply_fn=m.apply_fn, chunk_size=chunk, observe=method.observe)
  return logits, methods.compress(method, cache, obs), cache


@pytest.mark.parametrize("name", ["knorm", "streaming_llm"])
def test_selection_matches_offline_where_keys_agree(tiny, name):
  """StreamingLLM keeps the same positions in every layer; Knorm in layer 0, the only layer
  whose keys do not depend on the (compressed) context."""
  rng = np.random.RandomState(20)
  prompts = [rng.randint(0, 160, size=n).tolist() for n in (61, 37)]
  method = methods.make(name, ratio=0.25)
  _, online, kept = _online(tiny, prompts, method, 8)
  _, offline, full = _offline(tiny, prompts, method, 8)
  assert online.capacity <= gen.round_up(int(kept.max()) + 8, 8) < full.capacity
  assert online.nbytes < full.nbytes / 2
  np.testing.assert_array_equal(np.asarray(online.lengths), kept)
  layers = slice(None) if name == "streaming_llm" else slice(0, 1)
  for row, n in enumerate((16, 10)):  # ceil(.25 * 61), ceil(.25 * 37)
    got = np.sort(np.asarray(online.positions[layers, row, :, :n]), -1)
    want = np.asarray(offline.positions[layers, row, :, :n])
    np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(  # layer-0 keys of kept tokens are identical
      np.asarray(online.keys[0, 0, 0, :16])[np.argsort(np.asarray(online.positions[0, 0, 0, :16]))],
      np.asarray(offline.keys[0, 0, 0, :16]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["h2o", "snapkv", "tova", "expected_attention", "pyramidkv",
                                  "keyformer", "adakv"])
def test_every_method_runs_bounded(tiny, name):
  rng = np.random.RandomState(21)
  prompts = [rng.randint(0, 160, size=n).tolist() for n in (70, 45)]
  method = methods.make(name, ratio=0.25)
  logits, online, kept = _online(tiny, prompts, method, 8)
  assert online.capacity <= gen.round_up(int(kept.max()) + 8, 8)
  lens = np.asarray(online.lengths)
  if name != "adakv":
    np.testing.assert_array_equal(lens, kept)
  pos = np.asarray(online.positions)
  for l in range(pos.shape[0]):
    for b, n in enumerate((70, 45)):
      for k in range(pos.shape[2]):
        p = pos[l, b, k, : lens[l, b, k]]
        assert len(set(p)) == len(p) and p.min() >= 0 and p.max() <= n - 1
        if name not in ("tova", "expected_attention"):  # these force no recent window
          assert p.max() == n - 1
  assert np.isfinite(np.asarray(logits)).all()


def test_evict_during_prefill_then_quantize(tiny):
  """snapkv+kivi online: the eviction bounds the float cache per chunk, the kept is packed."""
  from lib.methods.kivi import KIVI  # pylint: disable=g-import-not-at-top
  from lib.online import prefill_context_compressing  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(22)
  prompts = [rng.randint(0, 160, size=n).tolist() for n in (200, 150)]
  c = tiny.config
  kw = dict(num_layers=c.num_layers, kv_heads=c.num_kv_heads, head_dim=c.head_dim, chunk_size=16)
  method = methods.Compose((methods.make("snapkv", ratio=0.5), KIVI(bits=4, group=16,
                                                                     residual=16)))
  cache, _, peak = prefill_context_compressing(tiny.params, tiny.apply_fn, prompts, method, **kw)
  total = np.asarray(cache.quant.lengths) + np.asarray(cache.lengths)
  np.testing.assert_array_equal(total[:, 0], 100)
  np.testing.assert_array_equal(total[:, 1], 75)
  assert cache.quant.k_codes.dtype == jnp.uint32
  assert cache.nbytes < peak  # the float cache of the scan was the peak
  with pytest.raises(ValueError, match="one eviction method, optionally followed by a quantizer"):
    prefill_context_compressing(tiny.params, tiny.apply_fn, prompts,
                                methods.make("knorm+snapkv", ratio=0.5), **kw)
  with pytest.raises(ValueError, match="compose them after one, e.g. snapkv\\+kivi"):
    prefill_context_compressing(tiny.params, tiny.apply_fn, prompts, methods.make("kivi"), **kw)


def test_ragged_budgets_end_paged(tiny):
  """AdaKV during prefill: the scan carries a padded cache (the peak); what it keeps ends in
  the paged layout, the same tokens as the scan's last selection."""
  from lib.online import prefill_context_compressing  # pylint: disable=g-import-not-at-top
  from lib.paged import PagedStore  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(23)
  prompts = [rng.randint(0, 160, size=n).tolist() for n in (120, 64)]
  c = tiny.config
  kw = dict(num_layers=c.num_layers, kv_heads=c.num_kv_heads, head_dim=c.head_dim, chunk_size=16)
  paged, _, peak = prefill_context_compressing(tiny.params, tiny.apply_fn, prompts,
                                               methods.make("adakv", ratio=0.25), **kw)
  padded, _, peak2 = prefill_context_compressing(
      tiny.params, tiny.apply_fn, prompts, methods.make("adakv:layout=padded", ratio=0.25), **kw)
  assert isinstance(paged.quant, PagedStore) and peak == peak2 == padded.nbytes
  assert paged.nbytes < peak
  lens = np.asarray(padded.lengths)
  np.testing.assert_array_equal(np.asarray(paged.quant.lengths), lens)
  pos = np.asarray(paged.quant.dense()[2])
  for l, b, k in np.ndindex(*lens.shape):
    np.testing.assert_array_equal(pos[l, b, k, :lens[l, b, k]],
                                  np.asarray(padded.positions)[l, b, k, :lens[l, b, k]])
