"""Ragged (paged) storage of AdaKV / PyramidKV caches: the cache's own layout stores only what
each head keeps, attention and the Pallas kernel read it in place, and it decodes like the
padded layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvlab import models
from compressed_run import run_compressed
from kvlab.lib import cache_io
from kvlab.lib import methods
from kvlab.lib.attention import dense_attention_reference
from kvlab.lib.paged import PagedStore, build
from kvlab.pallas_kernels import sparse_decode_attention as sda


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  path, _ = tiny_dir("llama_tied_bias")  # 4 kv heads: AdaKV budgets differ between them
  return models.load(path, progress=False, attn_block_size=16)


def _prompts():
  rng = np.random.RandomState(31)
  return [rng.randint(0, 160, size=n).tolist() for n in (150, 97)]


@pytest.mark.parametrize("name", ["adakv", "pyramidkv"])
def test_paged_decodes_like_padded_and_stores_less(tiny, name):
  opts = ":window=8" if name == "adakv" else ":window=8:beta=4"
  paged_m = methods.make(name + opts + ":page=8", ratio=0.3)
  padded_m = methods.make(name + opts + ":layout=padded", ratio=0.3)
  toks_p, logits_p, paged, _ = run_compressed(tiny, paged_m, _prompts())
  toks_d, logits_d, padded, _ = run_compressed(tiny, padded_m, _prompts())
  np.testing.assert_array_equal(toks_p, toks_d)
  np.testing.assert_allclose(logits_p, logits_d, rtol=1e-5, atol=1e-5)

  store = paged.quant
  assert isinstance(store, PagedStore) and int(paged.lengths.max()) == 0  # empty window
  lens = np.asarray(store.lengths)
  np.testing.assert_array_equal(lens, np.asarray(padded.lengths))
  assert len(np.unique(lens)) > 2  # the budgets really differ
  # only what each head keeps: the pool holds sum ceil(length / P) pages
  assert store.k_pages.shape[0] == int((-(-lens // 8)).sum())
  assert paged.trimmed().nbytes < padded.trimmed().nbytes
  # the same tokens, keys and values per head
  keys, values, pos = (np.asarray(x) for x in store.dense())
  for l, b, k in np.ndindex(*lens.shape):
    n = lens[l, b, k]
    np.testing.assert_array_equal(pos[l, b, k, :n], np.asarray(padded.positions[l, b, k, :n]))
    np.testing.assert_array_equal(keys[l, b, k, :n], np.asarray(padded.keys[l, b, k, :n]))
    np.testing.assert_array_equal(values[l, b, k, :n], np.asarray(padded.values[l, b, k, :n]))
    assert (pos[l, b, k, n:] == -1).all()


def test_kernel_reads_the_store_in_place(tiny):
  """The Pallas kernel (interpret mode) over ``store.kernel_inputs(layer)`` == its jnp reference
  == textbook attention over the padded cache, layer by layer."""
  m = methods.make("adakv:window=8:page=8", ratio=0.3)
  _, _, paged, _ = run_compressed(tiny, m, _prompts(), steps=1)
  padded = methods.make("adakv:window=8:layout=padded", ratio=0.3)
  _, _, dense, _ = run_compressed(tiny, padded, _prompts(), steps=1)
  store = paged.quant
  c = tiny.config
  b, k = dense.batch, dense.kv_heads
  g = c.num_heads // k
  q = jax.random.normal(jax.random.PRNGKey(0), (b, k, g, c.head_dim))
  for layer in range(c.num_layers):
    args = store.kernel_inputs(layer)
    got = sda.paged_decode_attention(q, *args, interpret=True)
    ref = sda.paged_decode_attention_reference(q, *args)
    valid = jnp.arange(dense.capacity) < dense.lengths[layer][..., None]
    qpos = jnp.full((b, 1), 10_000)
    want = dense_attention_reference(
        q.reshape(b, 1, k * g, -1), dense.keys[layer], dense.values[layer], qpos,
        dense.positions[layer], valid).reshape(b, k, g, -1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_build_with_empty_heads_and_odd_lengths():
  rng = np.random.RandomState(3)
  lengths = np.array([[[0, 5], [17, 8]]], np.int32)  # [L=1, B=2, K=2]
  keys = jnp.asarray(rng.randn(1, 2, 2, 20, 4), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32), (1, 2, 2, 20))
  store = build(keys, keys * 2, pos, jnp.asarray(lengths), page=8, block=16)
  assert store.k_pages.shape == (0 + 1 + 3 + 1, 8, 4)
  assert store.capacity % 16 == 0 and store.page_table.shape[-1] == 4
  k, v, p = (np.asarray(x) for x in store.dense())
  for _, bb, kk in np.ndindex(*lengths.shape):
    n = lengths[0, bb, kk]
    np.testing.assert_array_equal(k[0, bb, kk, :n], np.asarray(keys[0, bb, kk, :n]))
    np.testing.assert_array_equal(v[0, bb, kk, :n], 2 * np.asarray(keys[0, bb, kk, :n]))
    assert (p[0, bb, kk, :n] == np.arange(n)).all() and (p[0, bb, kk, n:] == -1).all()
  blk_k, _, blk_p = store.read(0, 8, 8)  # the second page of each head
  np.testing.assert_array_equal(blk_k[1, 0], np.asarray(keys[0, 1, 0, 8:16]))
  assert (np.asarray(blk_p[1, 0]) == np.arange(8, 16)).all()
  # The caller's host copy of the lengths (compress has them) gives the same store.
  same = build(keys, keys * 2, pos, jnp.asarray(lengths), page=8, block=16, host_lengths=lengths)
  for a, b in zip(jax.tree_util.tree_leaves(store), jax.tree_util.tree_leaves(same)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="host_lengths"):
    build(keys, keys, pos, jnp.asarray(lengths), page=8, host_lengths=lengths[0])


def test_saved_paged_cache_round_trips(tiny, tmp_path):
  m = methods.make("adakv:window=8", ratio=0.3)
  _, _, paged, _ = run_compressed(tiny, m, _prompts(), steps=1)
  path = cache_io.save_cache(paged, str(tmp_path / "paged"))
  back, _ = cache_io.load_cache(path)
  assert isinstance(back.quant, PagedStore) and back.quant.page == paged.quant.page
  for a, b in zip(jax.tree_util.tree_leaves(paged), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_composition_hands_the_padded_cache_on(tiny):
  """``adakv+kivi``: AdaKV's result goes to KIVI padded; only the final member's layout stays."""
  m = methods.make("adakv:window=8+kivi4:group=16:residual=16", ratio=0.5)
  _, logits, small, _ = run_compressed(tiny, m, _prompts())
  assert type(small.quant).__name__ == "QuantStore"
  assert np.isfinite(logits).all()


def test_bad_options():
  with pytest.raises(ValueError, match="layout must be 'paged'"):
    methods.make("adakv:layout=ragged", ratio=0.5)
  with pytest.raises(ValueError, match="page must be >= 1"):
    methods.make("pyramidkv:page=0", ratio=0.5)


def test_decode_through_the_kernel_matches_xla(tiny, tiny_dir):
  """``attn_impl="interpret"``: each decode step reads the paged store with the Pallas kernel
  (interpret mode) and merges its log normaliser into the online softmax; same tokens and
  logits as the XLA path."""
  path, _ = tiny_dir("llama_tied_bias")
  kern = models.load(path, progress=False, attn_block_size=16, attn_impl="interpret")
  m = methods.make("adakv:window=8:page=8", ratio=0.3)
  toks_x, logits_x, _, _ = run_compressed(tiny, m, _prompts(), steps=6)
  toks_k, logits_k, _, _ = run_compressed(kern, m, _prompts(), steps=6)
  np.testing.assert_array_equal(toks_k, toks_x)
  np.testing.assert_allclose(logits_k, logits_x, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="attn_impl must be one of"):
    models.load(path, progress=False, attn_impl="triton")


def test_kernel_log_normaliser_matches_reference():
  rng = np.random.RandomState(5)
  k_pages = jnp.asarray(rng.randn(6, 8, 16), jnp.float32)
  v_pages = jnp.asarray(rng.randn(6, 8, 16), jnp.float32)
  table = jnp.asarray([[[0, 1, 0], [2, 3, 4]], [[5, 0, 0], [0, 0, 0]]], jnp.int32)
  valid = jnp.asarray([[[8, 3, 0], [8, 8, 1]], [[5, 0, 0], [0, 0, 0]]], jnp.int32)  # one empty
  q = jnp.asarray(rng.randn(2, 2, 3, 16), jnp.float32)
  o, lse = sda.paged_decode_attention(q, k_pages, v_pages, table, valid, interpret=True,
                                      return_lse=True)
  o_r, lse_r = sda.paged_decode_attention_reference(q, k_pages, v_pages, table, valid,
                                                    return_lse=True)
  np.testing.assert_allclose(o, o_r, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lse, lse_r, rtol=1e-5, atol=1e-5)
  keys = np.asarray(k_pages)[[2, 3, 4]].reshape(-1, 16)[:17]  # head (0, 1): 17 tokens
  want = np.log(np.exp(np.asarray(q)[0, 1] @ keys.T / 4.0).sum(-1))
  np.testing.assert_allclose(lse[0, 1], want, rtol=1e-5)
  assert (np.asarray(lse[1, 1]) == -1e30).all() and (np.asarray(o[1, 1]) == 0).all()
