"""Bit packing and group quantizers: round trips and error bounds."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvlab.lib.quant import packing, uniform


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from(packing.SUPPORTED_BITS), words=st.integers(1, 6),
       rows=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, words, rows, seed):
  per_run, run_words = packing.period(bits)
  n = words * per_run
  codes = np.random.RandomState(seed).randint(0, 2**bits, size=(rows, n))
  packed = packing.pack(jnp.asarray(codes), bits)
  assert packed.dtype == jnp.uint32 and packed.shape == (rows, words * run_words)
  np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits)), codes)


def test_packing_saves_the_bits():
  codes = jnp.zeros((128, 128), jnp.uint8)
  assert packing.pack(codes, 2).nbytes * 8 == 128 * 128 * 2
  assert packing.pack(codes, 4).nbytes * 8 == 128 * 128 * 4
  assert packing.pack(codes, 3).nbytes * 8 == 128 * 128 * 3  # dense: codes straddle words


def test_three_bit_codes_straddle_words():
  codes = np.zeros(32, np.int64)
  codes[10] = 7  # stream bits 30..32: two low bits in word 0, the high bit in word 1
  w = np.asarray(packing.pack(jnp.asarray(codes), 3))
  assert w.tolist() == [3 << 30, 1, 0]
  with pytest.raises(ValueError, match="multiple of 32"):
    packing.pack(jnp.zeros((48,), jnp.int32), 3)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from((2, 4, 8)), group=st.sampled_from((8, 16, 32)),
       axis=st.sampled_from((-1, -2)), seed=st.integers(0, 2**16))
def test_quantize_error_is_at_most_half_a_step(bits, group, axis, seed):
  rng = np.random.RandomState(seed)
  x = (rng.randn(2, 3, 64, 64) * rng.uniform(0.1, 5)).astype(np.float32)
  x[0, 0, :, 5] += 20.0  # an outlier channel (keys have them)
  q = uniform.quantize(jnp.asarray(x), bits, group, axis)
  y = np.asarray(uniform.dequantize(q, bits, group, axis))
  scale = np.repeat(np.asarray(q.scale), group, axis=axis)
  assert (np.abs(y - x) <= scale / 2 + 1e-5 * (1 + np.abs(x))).all()
  assert np.abs(y - x).mean() < (np.abs(x).max() / (2**bits - 1))  # and not trivially loose


def test_constant_groups_are_exact_and_8bit_is_close():
  x = jnp.ones((1, 32, 64)) * 3.0
  q = uniform.quantize(x, 2, 32, -2)
  np.testing.assert_array_equal(np.asarray(uniform.dequantize(q, 2, 32, -2)), np.asarray(x))
  r = np.random.RandomState(0).randn(1, 32, 64).astype(np.float32)
  y = uniform.dequantize(uniform.quantize(jnp.asarray(r), 8, 32, -1), 8, 32, -1)
  assert np.abs(np.asarray(y) - r).max() < 0.02


@pytest.mark.parametrize("kw, msg", [
    (dict(bits=5, group=32, axis=-1), "unsupported bit width 5"),
    (dict(bits=3, group=16, axis=-1), "multiple of 32"),
    (dict(bits=2, group=48, axis=-2), "groups of 48"),
    (dict(bits=2, group=48, axis=-1), "head dim 64 does not split"),
])
def test_bad_quantizer_settings(kw, msg):
  with pytest.raises(ValueError, match=msg):
    uniform.quantize(jnp.zeros((1, 64, 48 if kw["bits"] == 3 else 64)), **kw)
