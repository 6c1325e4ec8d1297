"""Pallas quantized decode attention == its jnp reference, and both == exact attention over the
dequantized cache. Interpret mode on CPU; compiled (Triton / Mosaic) where JAX's default backend
is an accelerator, so the same suite checks the real kernel there."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvlab.lib.quant import uniform
from kvlab.pallas_kernels.quantized_decode_attention import (quantized_decode_attention,
                                                       quantized_decode_attention_reference)

INTERPRET = jax.default_backend() == "cpu"  # compiled on GPU / TPU


def _case(rng, b, k, g, h, s, r, bits, group, n_quant, n_res):
  keys = rng.randn(b, k, s, h).astype(np.float32)
  keys[..., 3] *= 8.0  # an outlier channel
  vals = rng.randn(b, k, s, h).astype(np.float32)
  kq = uniform.quantize(jnp.asarray(keys), bits, group, -2)
  vq = uniform.quantize(jnp.asarray(vals), bits, group, -1)
  return dict(
      q=jnp.asarray(rng.randn(b, k, g, h).astype(np.float32)),
      k_codes=kq.codes, k_scale=kq.scale, k_zero=kq.zero,
      v_codes=vq.codes, v_scale=vq.scale, v_zero=vq.zero,
      n_quant=jnp.asarray(n_quant, jnp.int32),
      k_res=jnp.asarray(rng.randn(b, k, r, h).astype(np.float32)),
      v_res=jnp.asarray(rng.randn(b, k, r, h).astype(np.float32)),
      n_res=jnp.asarray(n_res, jnp.int32))


@settings(max_examples=6, deadline=None)
@given(b=st.integers(1, 4), k=st.integers(1, 8), g=st.integers(1, 8), h=st.sampled_from((64, 128)),
       bits=st.sampled_from((2, 4, 8)), blocks=st.integers(1, 3), residual=st.booleans(),
       partitions=st.sampled_from((None, 1, 2, 3)), bf16_dots=st.booleans(),
       seed=st.integers(0, 2**16), data=st.data())
def test_kernel_matches_reference(b, k, g, h, bits, blocks, residual, partitions, bf16_dots, seed,
                                  data):
  rng = np.random.RandomState(seed)
  group, block = 32, 64
  s = blocks * block
  r = 32 if residual else 8
  # Lengths not a multiple of the block (and zero residual when "without residual window").
  n_quant = data.draw(st.lists(st.integers(1, s), min_size=b * k, max_size=b * k))
  n_res = data.draw(st.lists(st.integers(0, r), min_size=b * k, max_size=b * k)) if residual \
      else [0] * (b * k)
  case = _case(rng, b, k, g, h, s, r, bits, group, np.reshape(n_quant, (b, k)),
               np.reshape(n_res, (b, k)))
  ref = quantized_decode_attention_reference(**case, bits=bits, group=group, block=block)
  # partitions: split-K runs of blocks (more than there are blocks is clamped), merged after
  out = quantized_decode_attention(**case, bits=bits, group=group, block=block,
                                   interpret=INTERPRET, partitions=partitions,
                                   dot_dtype=jnp.bfloat16 if bf16_dots else jnp.float32)
  # bf16 dot operands: about 3 significant digits per product; on 36 cases (2/4/8 bits, head
  # dim 64/128) the largest error was 0.015 on outputs of magnitude ~1-2
  tol = dict(rtol=3e-2, atol=3e-2) if bf16_dots else dict(rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **tol)


def test_reference_is_attention_over_the_dequantized_cache():
  rng = np.random.RandomState(3)
  b, k, g, h, s, r = 1, 2, 3, 64, 128, 16
  case = _case(rng, b, k, g, h, s, r, 4, 32, [[100, 128]], [[16, 5]])
  out = np.asarray(quantized_decode_attention_reference(**case, bits=4, group=32))
  kd = np.asarray(uniform.dequantize(uniform.Quantized(case["k_codes"], case["k_scale"],
                                                       case["k_zero"]), 4, 32, -2))
  vd = np.asarray(uniform.dequantize(uniform.Quantized(case["v_codes"], case["v_scale"],
                                                       case["v_zero"]), 4, 32, -1))
  for kk, (nq, nr) in enumerate([(100, 16), (128, 5)]):
    keys = np.concatenate([kd[0, kk, :nq], np.asarray(case["k_res"])[0, kk, :nr]])
    vals = np.concatenate([vd[0, kk, :nq], np.asarray(case["v_res"])[0, kk, :nr]])
    logits = np.asarray(case["q"])[0, kk] @ keys.T / np.sqrt(h)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out[0, kk], p @ vals, rtol=1e-4, atol=1e-5)


def test_bad_kernel_arguments():
  rng = np.random.RandomState(0)
  case = _case(rng, 1, 1, 1, 64, 64, 8, 2, 32, [[64]], [[0]])
  with pytest.raises(ValueError, match="block 48 must be a multiple of group 32"):
    quantized_decode_attention_reference(**case, bits=2, group=32, block=48)
  with pytest.raises(ValueError, match="unsupported bit width 5"):
    quantized_decode_attention_reference(**case, bits=5, group=32, block=64)
  with pytest.raises(ValueError, match="dot_dtype must be float32 or bfloat16"):
    quantized_decode_attention(**case, bits=2, group=32, block=32, interpret=INTERPRET,
                               dot_dtype=jnp.float16)
  with pytest.raises(ValueError, match="partitions must be >= 1, got 0"):
    quantized_decode_attention(**case, bits=2, group=32, block=32, interpret=INTERPRET,
                               partitions=0)


@pytest.mark.parametrize("partitions", [1, 2])
def test_log_normaliser_matches_reference_and_hand_computation(partitions):
  rng = np.random.RandomState(8)
  b, k, g, h, s, r = 1, 2, 3, 64, 128, 8
  case = _case(rng, b, k, g, h, s, r, 4, 32, [[100, 0]], [[5, 0]])  # head 1: nothing valid
  o, lse = quantized_decode_attention(**case, bits=4, group=32, block=64, interpret=INTERPRET,
                                      return_lse=True, partitions=partitions)
  o_r, lse_r = quantized_decode_attention_reference(**case, bits=4, group=32, return_lse=True)
  np.testing.assert_allclose(o, o_r, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(lse, lse_r, rtol=1e-5, atol=1e-5)
  kd = np.asarray(uniform.dequantize(uniform.Quantized(case["k_codes"], case["k_scale"],
                                                       case["k_zero"]), 4, 32, -2))
  keys = np.concatenate([kd[0, 0, :100], np.asarray(case["k_res"])[0, 0, :5]])
  want = np.log(np.exp(np.asarray(case["q"])[0, 0] @ keys.T / 8.0).sum(-1))
  np.testing.assert_allclose(np.asarray(lse)[0, 0], want, rtol=1e-5)
  assert (np.asarray(lse)[0, 1] == -1e30).all()
