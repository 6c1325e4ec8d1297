"""Chunked online-softmax attention == textbook softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvlab.lib.attention import chunk_attention, decode_block_size, dense_attention_reference


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 3), kh=st.integers(1, 3), g=st.integers(1, 3),
       t=st.integers(1, 9), blocks=st.integers(1, 4), bs=st.sampled_from([4, 8]),
       tail=st.integers(0, 7), window=st.sampled_from([None, 3, 11]), seed=st.integers(0, 1000))
def test_chunk_attention_matches_dense(b, kh, g, t, blocks, bs, tail, window, seed):
  """Any capacity (not a multiple of the block), ragged and empty heads, windows."""
  h = 8
  s = blocks * bs + tail
  rng = np.random.RandomState(seed)
  lengths = rng.randint(0, s + 1, size=(b, kh)).astype(np.int32)  # ragged, possibly empty
  q = rng.randn(b, t, kh * g, h).astype(np.float32)
  k_new = rng.randn(b, kh, t, h).astype(np.float32)
  v_new = rng.randn(b, kh, t, h).astype(np.float32)
  ck = rng.randn(b, kh, s, h).astype(np.float32)
  cv = rng.randn(b, kh, s, h).astype(np.float32)
  # Cached tokens keep arbitrary (evicted/reordered) earlier positions.
  start = 40
  cpos = np.stack([[np.sort(rng.choice(start, s, replace=False)) for _ in range(kh)]
                   for _ in range(b)]).astype(np.int32)
  qpos = (start + np.arange(t))[None].repeat(b, 0).astype(np.int32)
  out = chunk_attention(jnp.asarray(q), k_new, v_new, ck, cv, cpos, lengths, qpos,
                        sliding_window=window, block_size=bs)
  valid = np.arange(s)[None, None] < lengths[..., None]
  allk = np.concatenate([ck, k_new], 2)
  allv = np.concatenate([cv, v_new], 2)
  allpos = np.concatenate([cpos, qpos[:, None].repeat(kh, 1)], 2)
  allvalid = np.concatenate([valid, np.ones((b, kh, t), bool)], 2)
  ref = dense_attention_reference(q, allk, allv, qpos, allpos, allvalid, window)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("t,rows,window", [(8, 4, None), (12, 4, 3), (16, 4, 11), (256, 128, None),
                                           (384, 128, 100)])
def test_chunk_attending_to_itself_by_row_blocks_equals_dense(monkeypatch, t, rows, window):
  """A prefill chunk's causal attention to itself by blocks of ``SELF_ROWS`` query rows (CPU),
  each against only the keys up to its last row, == the dense reference and == one ``T x T``
  block; with a cache before it (full blocks: the bias-free fold) and a sliding window."""
  from kvlab.lib import attention as attention  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(t)
  b, kh, g, h, s = 2, 2, 2, 8, 16
  q = rng.randn(b, t, kh * g, h).astype(np.float32)
  k_new, v_new = (rng.randn(b, kh, t, h).astype(np.float32) for _ in range(2))
  ck, cv = (rng.randn(b, kh, s, h).astype(np.float32) for _ in range(2))
  cpos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, kh, s))
  lengths = np.array([[s, s], [s, 9]], np.int32)  # full cache blocks, and a ragged head
  qpos = (s + np.arange(t))[None].repeat(b, 0).astype(np.int32)
  run = lambda: np.asarray(chunk_attention(jnp.asarray(q), k_new, v_new, ck, cv, cpos, lengths,
                                           qpos, sliding_window=window, block_size=8))
  monkeypatch.setattr(attention, "SELF_ROWS", rows)
  by_rows = run()
  monkeypatch.setattr(attention, "SELF_ROWS", 10 ** 6)  # one T x T block
  whole = run()
  valid = np.arange(s)[None, None] < lengths[..., None]
  ref = dense_attention_reference(
      q, np.concatenate([ck, k_new], 2), np.concatenate([cv, v_new], 2), qpos,
      np.concatenate([cpos, qpos[:, None].repeat(kh, 1)], 2),
      np.concatenate([valid, np.ones((b, kh, t), bool)], 2), window)
  np.testing.assert_allclose(by_rows, np.asarray(ref), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(by_rows, whole, atol=2e-6, rtol=2e-6)


def test_stacked_layer_indexing_equals_per_layer():
  rng = np.random.RandomState(0)
  l, b, kh, s, h, t = 3, 2, 2, 16, 8, 2
  ck = rng.randn(l, b, kh, s, h).astype(np.float32)
  cv = rng.randn(l, b, kh, s, h).astype(np.float32)
  cpos = np.broadcast_to(np.arange(s, dtype=np.int32), (l, b, kh, s))
  lens = rng.randint(1, s, size=(l, b, kh)).astype(np.int32)
  q = rng.randn(b, t, kh * 2, h).astype(np.float32)
  kn = rng.randn(b, kh, t, h).astype(np.float32)
  qpos = np.full((b, t), s, np.int32) + np.arange(t)
  for layer in range(l):
    a = chunk_attention(q, kn, kn, ck, cv, cpos, lens, qpos, layer=jnp.int32(layer), block_size=8)
    r = chunk_attention(q, kn, kn, ck[layer], cv[layer], cpos[layer], lens[layer], qpos,
                        block_size=8)
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-6)


def test_no_nan_with_empty_cache_and_jit():
  f = jax.jit(lambda *a: chunk_attention(*a, block_size=4))
  z = jnp.zeros((1, 2, 8, 4))
  out = f(jnp.ones((1, 1, 2, 4)), jnp.ones((1, 2, 1, 4)), jnp.ones((1, 2, 1, 4)), z, z,
          jnp.zeros((1, 2, 8), jnp.int32), jnp.zeros((1, 2), jnp.int32),
          jnp.zeros((1, 1), jnp.int32))
  np.testing.assert_allclose(np.asarray(out), 1.0)


def test_decode_block_shrinks_with_the_batch_and_stays_exact():
  """A batched decode step reads smaller blocks (``decode_block_size``) and still equals the
  textbook softmax, ragged lengths and a capacity that is no multiple of the block included."""
  assert decode_block_size(512, 1, 3, 64) == 512  # 0.4 MiB of keys per block
  assert decode_block_size(512, 8, 3, 64) == 128
  assert decode_block_size(512, 64, 8, 128) == 64  # never below 64 slots
  # Given the capacity: the fewest blocks within 1 MiB (1365 slots here), evenly sized.
  assert decode_block_size(512, 1, 3, 64, capacity=544) == 544  # one block, not 512 + 512
  assert decode_block_size(512, 1, 3, 64, capacity=2088) == 1048  # two blocks
  assert decode_block_size(512, 8, 3, 64, capacity=700) == 144  # five of at most 170 slots
  assert decode_block_size(512, 64, 8, 128, capacity=104) == 64
  assert decode_block_size(512, 1, 3, 64, capacity=40) == 40
  rng = np.random.RandomState(0)
  b, kh, g, h, s = 8, 3, 3, 64, 700
  lengths = rng.randint(0, s + 1, size=(b, kh)).astype(np.int32)
  lengths[0, 0] = 0
  q = rng.randn(b, 1, kh * g, h).astype(np.float32)
  kn, vn = rng.randn(b, kh, 1, h).astype(np.float32), rng.randn(b, kh, 1, h).astype(np.float32)
  ck, cv = rng.randn(b, kh, s, h).astype(np.float32), rng.randn(b, kh, s, h).astype(np.float32)
  cpos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, kh, s))
  qpos = np.full((b, 1), s, np.int32)
  out = chunk_attention(jnp.asarray(q), kn, vn, ck, cv, cpos, lengths, qpos, block_size=512)
  valid = np.arange(s)[None, None] < lengths[..., None]
  ref = dense_attention_reference(
      q, np.concatenate([ck, kn], 2), np.concatenate([cv, vn], 2), qpos,
      np.concatenate([cpos, qpos[:, None].repeat(kh, 1)], 2),
      np.concatenate([valid, np.ones((b, kh, 1), bool)], 2), None)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
