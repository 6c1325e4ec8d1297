"""Paged decode attention: kernel == jnp reference == dense attention, on ragged lengths (empty
heads, lengths not a multiple of the page) and on selected blocks. Interpret mode on CPU; compiled
where JAX's default backend is an accelerator, so the same suite checks the real kernel there."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvlab.lib.attention import dense_attention_reference
from kvlab.pallas_kernels import sparse_decode_attention as sda

INTERPRET = jax.default_backend() == "cpu"  # compiled on GPU / TPU
# Triton takes pages of a power of two >= 16 slots (the kernel says so on GPU); the interpreter
# also checks the smaller pages.
PAGES = (8, 16) if INTERPRET else (16, 32)


def _dense(q, keys, values, lengths):
  """Masked dense attention of one decode query per (b, k, g) over ``lengths`` slots."""
  b, k, g, h = q.shape
  s = keys.shape[2]
  valid = np.arange(s)[None, None, :] < np.asarray(lengths)[..., None]
  pos = np.broadcast_to(np.arange(s), (b, k, s))
  qq = jnp.asarray(q).transpose(0, 1, 2, 3).reshape(b, 1, k * g, h)
  out = dense_attention_reference(qq, keys, values, jnp.full((b, 1), s), jnp.asarray(pos),
                                  jnp.asarray(valid))
  out = np.asarray(out).reshape(b, k, g, h)
  return np.where(np.asarray(lengths)[..., None, None] > 0, out, 0.0)  # empty head -> 0


@settings(max_examples=5, deadline=None)
@given(b=st.integers(1, 3), k=st.integers(1, 4), g=st.integers(1, 4),
       h=st.sampled_from((32, 64)), page=st.sampled_from(PAGES), s=st.integers(1, 70),
       partitions=st.sampled_from((None, 1, 2, 3)), seed=st.integers(0, 2**16))
def test_ragged_kernel_matches_reference_and_dense(b, k, g, h, page, s, partitions, seed):
  rng = np.random.RandomState(seed)
  keys = rng.randn(b, k, s, h).astype(np.float32)
  values = rng.randn(b, k, s, h).astype(np.float32)
  lengths = rng.randint(0, s + 1, size=(b, k))
  lengths[0, 0] = 0  # an empty head
  q = rng.randn(b, k, g, h).astype(np.float32)
  kp, vp, table, valid = sda.to_pages(jnp.asarray(keys), jnp.asarray(values), lengths, page)
  assert kp.shape[0] == max(int((-(-lengths // page)).sum()), 1)  # only the pages in use
  ref = np.asarray(sda.paged_decode_attention_reference(jnp.asarray(q), kp, vp, table, valid))
  ker = np.asarray(sda.paged_decode_attention(jnp.asarray(q), kp, vp, table, valid,
                                              interpret=INTERPRET, partitions=partitions))
  want = _dense(q, jnp.asarray(keys), jnp.asarray(values), lengths)
  np.testing.assert_allclose(ref, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ker, ref, rtol=1e-4, atol=1e-5)


@settings(max_examples=6, deadline=None)
@given(b=st.integers(1, 2), k=st.integers(1, 3), g=st.integers(1, 3), nb=st.integers(2, 6),
       sel=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_block_selection_kernel_matches_reference(b, k, g, nb, sel, seed):
  rng = np.random.RandomState(seed)
  page, h = PAGES[0], 32
  s = nb * page
  keys = jnp.asarray(rng.randn(b, k, s, h), jnp.float32)
  values = jnp.asarray(rng.randn(b, k, s, h), jnp.float32)
  lengths = jnp.asarray(rng.randint(1, s + 1, size=(b, k)))
  q = jnp.asarray(rng.randn(b, k, g, h), jnp.float32)
  kp, vp = sda.as_pages(keys, values, page)
  table, valid = sda.select_blocks(q, keys, lengths, page, min(sel, nb))
  ref = sda.paged_decode_attention_reference(q, kp, vp, table, valid)
  ker = sda.paged_decode_attention(q, kp, vp, table, valid, interpret=INTERPRET, partitions=2)
  np.testing.assert_allclose(np.asarray(ker), np.asarray(ref), rtol=1e-4, atol=1e-5)
  # selecting every block is exact attention over the whole valid cache
  table_all, valid_all = sda.select_blocks(q, keys, lengths, page, nb)
  full = sda.paged_decode_attention(q, kp, vp, table_all, valid_all, interpret=INTERPRET)
  np.testing.assert_allclose(np.asarray(full), _dense(q, keys, values, lengths), rtol=1e-4,
                             atol=1e-5)
  assert int(np.asarray(valid).sum(-1).max()) <= min(sel, nb) * page


def test_bad_layouts():
  q = jnp.zeros((1, 2, 1, 32))
  kp = jnp.zeros((3, 8, 32))
  with pytest.raises(ValueError, match="must be \\[1, 2, M\\]"):
    sda.paged_decode_attention_reference(q, kp, kp, jnp.zeros((1, 3, 2), jnp.int32),
                                         jnp.zeros((1, 3, 2), jnp.int32))
  with pytest.raises(ValueError, match="must both be \\[N, P, 32\\]"):
    sda.paged_decode_attention_reference(q, kp, jnp.zeros((3, 8, 16)),
                                         jnp.zeros((1, 2, 2), jnp.int32),
                                         jnp.zeros((1, 2, 2), jnp.int32))
  with pytest.raises(ValueError, match="pad the cache"):
    sda.as_pages(jnp.zeros((1, 1, 10, 32)), jnp.zeros((1, 1, 10, 32)), 8)
