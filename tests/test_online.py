"""Compress during chunked prefill: bounded cache, exact where the method allows it."""

import jax.numpy as jnp
import numpy as np
import pytest

from kvlab import models
from kvlab.lib import generate as gen
from kvlab.lib import methods
from kvlab.lib.online import online_capacity, prefill_compressing


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
                                  "keyformer", "adakv", "adakv:scorer=h2o",
                                  "adakv:scorer=expected_attention", "adakv:scorer=tova"])
def test_every_method_runs_bounded(tiny, name):
  rng = np.random.RandomState(21)
  prompts = [rng.randint(0, 160, size=n).tolist() for n in (70, 45)]
  method = methods.make(name, ratio=0.25)
  logits, online, kept = _online(tiny, prompts, method, 8)
  assert online.capacity <= gen.round_up(int(kept.max()) + 8, 8)
  lens = np.asarray(online.lengths)
  if not name.startswith("adakv"):
    np.testing.assert_array_equal(lens, kept)
  pos = np.asarray(online.positions)
  for l in range(pos.shape[0]):
    for b, n in enumerate((70, 45)):
      for k in range(pos.shape[2]):
        p = pos[l, b, k, : lens[l, b, k]]
        assert len(set(p)) == len(p) and p.min() >= 0 and p.max() <= n - 1
        if not name.endswith(("tova", "expected_attention")):  # these force no recent window
          assert p.max() == n - 1
  assert np.isfinite(np.asarray(logits)).all()


def test_evict_during_prefill_then_quantize(tiny):
  """snapkv+kivi online: the eviction bounds the float cache per chunk, the kept is packed."""
  from kvlab.lib.methods.kivi import KIVI  # pylint: disable=g-import-not-at-top
  from kvlab.lib.online import prefill_context_compressing  # pylint: disable=g-import-not-at-top
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
                                methods.make("knorm:ratio=0.5+snapkv", ratio=0.5), **kw)
  with pytest.raises(ValueError, match="compose them after one, e.g. snapkv\\+kivi"):
    prefill_context_compressing(tiny.params, tiny.apply_fn, prompts, methods.make("kivi"), **kw)


def test_ragged_budgets_end_paged(tiny):
  """AdaKV during prefill: the scan carries a padded cache (the peak); what it keeps ends in
  the paged layout, the same tokens as the scan's last selection."""
  from kvlab.lib.online import prefill_context_compressing  # pylint: disable=g-import-not-at-top
  from kvlab.lib.paged import PagedStore  # pylint: disable=g-import-not-at-top
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


def _each_chunk(m, prompts, spec, chunk=16, ratio=0.5, key_bits=8, **kw):
  from kvlab.lib.methods.kivi import KIVI  # pylint: disable=g-import-not-at-top
  from kvlab.lib.online import prefill_context_compressing  # pylint: disable=g-import-not-at-top
  c = m.config
  kivi = KIVI(bits=4, group=16, residual=16, prefill_key_bits=key_bits)
  method = methods.Compose((methods.make(spec, ratio=ratio), kivi))
  return prefill_context_compressing(m.params, m.apply_fn, prompts, method,
                                     num_layers=c.num_layers, kv_heads=c.num_kv_heads,
                                     head_dim=c.head_dim, chunk_size=chunk, **kw)


@pytest.mark.parametrize("spec", ["snapkv", "expected_attention", "h2o"])
def test_quantize_each_chunk_keeps_the_budget_packed(tiny, spec):
  """evict+kivi, quantized after every chunk: the float window ends below residual + group
  tokens, the kept tokens are the budget (unique, in range), the peak is below
  quantize-at-the-end's, and the packed layer-0 keys are the tokens' own keys (layer 0's keys
  do not depend on the context) to 4-bit precision: with keys staged at 8 bits between chunks
  as precise as packing once, at 4 bits throughout worse (compounded) but bounded."""
  rng = np.random.RandomState(24)
  prompts = [rng.randint(0, 160, size=n).tolist() for n in (400, 300)]
  cache, _, peak = _each_chunk(tiny, prompts, spec, quantize_each_chunk=True)
  cache4, _, peak4 = _each_chunk(tiny, prompts, spec, key_bits=4, quantize_each_chunk=True)
  end, _, peak_end = _each_chunk(tiny, prompts, spec)
  assert cache.capacity <= 32 and cache.quant.k_codes.dtype == jnp.uint32  # window, trimmed
  assert cache.quant.k_bits == cache4.quant.k_bits == 4  # re-packed at `bits` at the end
  assert cache.quant.k_codes.shape == cache4.quant.k_codes.shape
  assert peak4 < peak < peak_end and cache.nbytes < peak4
  n_q, n_w = np.asarray(cache.quant.lengths), np.asarray(cache.lengths)
  np.testing.assert_array_equal((n_q + n_w)[:, 0], 200)
  np.testing.assert_array_equal((n_q + n_w)[:, 1], 150)
  np.testing.assert_array_equal(n_q % 16, 0)
  assert (n_w >= 16).all() and (n_w < 32).all()  # residual <= window < residual + group
  np.testing.assert_array_equal(n_q + n_w, np.asarray(end.quant.lengths + end.lengths))
  store_pos = np.asarray(cache.quant.positions)
  win_pos = np.asarray(cache.positions)
  for l, b, k in np.ndindex(*n_q.shape):
    pos = np.concatenate([store_pos[l, b, k, :n_q[l, b, k]], win_pos[l, b, k, :n_w[l, b, k]]])
    assert (np.diff(pos) > 0).all() and pos.min() >= 0 and pos.max() < len(prompts[b])
  # Layer 0: dequantized store keys against the float keys of a full prefill, same positions
  # (layer 0's keys do not depend on the context). Quantized once at the end, the relative
  # error is 4-bit rounding (~0.06); re-quantized at 4 bits after every chunk the keys regroup
  # and the error compounds (~0.13 here, 25 chunks); staged at 8 bits it is the end's again;
  # a wrong gather would give ~1.4.
  full_cache = tiny.new_cache(2, 400)
  tokens, lengths = gen.pad_batch(prompts, 16)
  _, full_cache, _ = gen.prefill(tiny.params, jnp.asarray(tokens), jnp.asarray(lengths),
                                 full_cache, apply_fn=tiny.apply_fn, chunk_size=16)

  def key_error(c):
    kq, vq, pq = c.quant.read(0, 0, c.quant.capacity)
    n = np.asarray(c.quant.lengths)[0]
    errs = []
    for b, k in np.ndindex(*n.shape):
      pos = np.asarray(pq[b, k, :n[b, k]])
      for got, ref in ((kq, full_cache.keys), (vq, full_cache.values)):
        want = np.asarray(ref[0, b, k])[pos]
        errs.append(np.linalg.norm(np.asarray(got[b, k, :n[b, k]]) - want) / np.linalg.norm(want))
    return np.asarray(errs).reshape(-1, 2).max(0)  # (keys, values)

  (k_each, v_each), (k4, _), (k_end, v_end) = key_error(cache), key_error(cache4), key_error(end)
  assert k_end < 0.09 and v_end < 0.09 and v_each < 0.09 and k4 < 0.2, (k4, k_end)
  assert k_each < 0.09 and k_each < 0.75 * k4, (k_each, k4, k_end)
  logits, _, _ = tiny.apply_fn(tiny.params, jnp.asarray([[5], [7]]),
                               cache.resize(cache.capacity + 8).replace(
                                   quant=cache.quant.grown(16)),
                               jnp.asarray([1, 1]), jnp.asarray([0, 0]))
  assert np.isfinite(np.asarray(logits)).all()


def test_quantize_each_chunk_refuses_what_it_cannot_do(tiny):
  from kvlab.lib.online import prefill_context_compressing  # pylint: disable=g-import-not-at-top
  c = tiny.config
  kw = dict(num_layers=c.num_layers, kv_heads=c.num_kv_heads, head_dim=c.head_dim,
            quantize_each_chunk=True)
  for spec in ("snapkv", "snapkv+kvquant4"):
    with pytest.raises(ValueError, match="one KIVI quantizer"):
      prefill_context_compressing(tiny.params, tiny.apply_fn, [list(range(40))],
                                  methods.make(spec, ratio=0.5), **kw)


@pytest.mark.parametrize("gumbel_tau", [None, 0.7])
def test_column_sums_read_the_store_as_its_dequantized_cache(tiny, gumbel_tau):
  """H2O's / Keyformer's hook over a KIVI-quantized cache (store + window) gives the column
  sums of the same tokens held dequantized in a plain cache: the store's slots first."""
  from kvlab.lib.methods.accumulated import column_sums  # pylint: disable=g-import-not-at-top
  from kvlab.lib.methods.kivi import KIVI  # pylint: disable=g-import-not-at-top
  from kvlab.lib.online_quantized import _joined_layer  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(25)
  prompts = [rng.randint(0, 160, size=n).tolist() for n in (100, 70)]
  tokens, lengths = gen.pad_batch(prompts, 8)
  cache = tiny.new_cache(2, tokens.shape[1])
  _, cache, _ = gen.prefill(tiny.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                            apply_fn=tiny.apply_fn, chunk_size=8)
  quant = KIVI(bits=4, group=16, residual=16).apply(cache, extra=16)
  layers = [_joined_layer(quant, l) for l in range(cache.num_layers)]
  plain = layers[0].replace(**{f: jnp.concatenate([getattr(x, f) for x in layers])
                               for f in ("keys", "values", "positions", "lengths")})
  chunk = jnp.asarray(rng.randint(0, 160, size=(2, 8)))
  n_valid, last = jnp.asarray([8, 5]), jnp.asarray([7, 4])
  hook = column_sums(gumbel_tau, 3)
  _, _, raw = tiny.apply_fn(tiny.params, chunk, quant, n_valid, last, hook)
  _, _, want = tiny.apply_fn(tiny.params, chunk, plain, n_valid, last, hook)
  q_cap = quant.quant.capacity
  n_q = np.asarray(quant.quant.lengths)
  n = n_q + np.asarray(quant.lengths) + np.asarray(n_valid)[None, :, None]
  raw, want = np.asarray(raw), np.asarray(want)
  assert raw.shape[-1] == q_cap + quant.capacity
  for l, b, k in np.ndindex(*n_q.shape):
    m = n_q[l, b, k]
    got = np.concatenate([raw[l, b, k, :m], raw[l, b, k, q_cap:][:n[l, b, k] - m]])
    np.testing.assert_allclose(got, want[l, b, k, :n[l, b, k]], rtol=2e-4, atol=1e-6)
  assert raw.sum() > 0
