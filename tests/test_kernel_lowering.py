"""The decode kernels lower for GPU (Triton) on a CPU-only machine, their GPU-side padding gives
the same results (run interpreted), and platforms without a lowering get one clear error.

Lowering builds the Triton IR the GPU would compile and runs MLIR's verifier on it; it does not
compile or run it (no GPU in CI)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.triton import pallas_call_registration as triton_registration

from kvlab.pallas_kernels import platform as platform_lib
from kvlab.pallas_kernels import quantized_decode_attention as qda
from kvlab.pallas_kernels import sparse_decode_attention as sda
from tests.test_quantized_decode_kernel import _case


def _paged_case(b=2, k=3, g=3, h=64, page=16, s=70, seed=0):
  rng = np.random.RandomState(seed)
  keys = jnp.asarray(rng.randn(b, k, s, h).astype(np.float32))
  values = jnp.asarray(rng.randn(b, k, s, h).astype(np.float32))
  lengths = rng.randint(0, s + 1, size=(b, k))
  lengths[0, 0] = 0
  q = jnp.asarray(rng.randn(b, k, g, h).astype(np.float32))
  return (q, *sda.to_pages(keys, values, lengths, page))


def _quant_case(bits, g=3, r=40):
  rng = np.random.RandomState(bits)
  return _case(rng, 2, 3, g, 64, 256, r, bits, 32, [[200, 1, 64], [256, 37, 129]],
               [[r, 0, 3], [5, 17, r]])


def _lowered_for_cuda(fn):
  """The HLO text of ``fn`` lowered for CUDA, after running MLIR's verifier on every Triton module
  it builds: the GPU verifies them when it compiles, and lowering alone does not (an i1 loop bound
  against an i32 one passed here and failed on the H200)."""
  built = []

  def verified(*args, **kwargs):
    result = lower_to_triton(*args, **kwargs)
    result.module.operation.verify()  # raises MLIRError naming the op
    built.append(result)
    return result

  lower_to_triton = triton_registration.lowering.lower_jaxpr_to_triton_module
  triton_registration.lowering.lower_jaxpr_to_triton_module = verified
  try:
    text = jax.jit(fn).trace().lower(lowering_platforms=("cuda",)).as_text()
  finally:
    triton_registration.lowering.lower_jaxpr_to_triton_module = lower_to_triton
  assert built, "no Triton kernel was lowered"
  return text


def test_paged_kernel_lowers_for_gpu_through_triton():
  case = _paged_case()  # G = 3, 6 pages listed: neither a power of two
  text = _lowered_for_cuda(lambda: sda.paged_decode_attention(*case, platform="gpu",
                                                              return_lse=True))
  assert "xla.gpu.triton" in text  # the Triton kernel call
  # split-K by default on GPU: (2 rows x 3 kv heads) x 4 partitions, one per table entry
  assert "tensor<2x3x4x16x64xf32>" in text


@pytest.mark.parametrize("bits,dots", [(2, jnp.float32), (4, jnp.float32), (8, jnp.float32),
                                       (4, jnp.bfloat16)])
def test_quantized_kernel_lowers_for_gpu_through_triton(bits, dots):
  case = _quant_case(bits)  # G = 3, a 40-slot residual window
  text = _lowered_for_cuda(lambda: qda.quantized_decode_attention(
      **case, bits=bits, group=32, block=64, platform="gpu", return_lse=True, dot_dtype=dots))
  assert "xla.gpu.triton" in text  # the Triton kernel call
  # split-K by default on GPU: 4 blocks of 64 slots, (2 rows x 3 kv heads) x 4 partitions
  assert "tensor<2x3x4x16x64xf32>" in text


def test_gpu_padding_gives_the_reference_results():
  """The GPU path (G padded to 16, pages and residual to powers of two), run interpreted."""
  case = _paged_case(g=3)
  ref = sda.paged_decode_attention_reference(*case, return_lse=True)
  out = sda.paged_decode_attention(*case, interpret=True, platform="gpu", return_lse=True)
  for a, r in zip(out, ref):
    assert a.shape == r.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-5)
  case = _quant_case(4)
  ref = qda.quantized_decode_attention_reference(**case, bits=4, group=32, block=128,
                                                  return_lse=True)
  out = qda.quantized_decode_attention(**case, bits=4, group=32, block=128, interpret=True,
                                       platform="gpu", return_lse=True)
  for a, r in zip(out, ref):
    assert a.shape == r.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=2e-4, atol=2e-5)


def test_platforms_without_a_lowering_say_what_to_do():
  case = _paged_case()
  with pytest.raises(NotImplementedError, match="interpret=True.*impl=.xla."):
    sda.paged_decode_attention(*case, platform="cpu")
  with pytest.raises(NotImplementedError, match="compiled only for GPU .Triton. and TPU"):
    qda.quantized_decode_attention(**_quant_case(2), bits=2, group=32, platform="cpu")
  with pytest.raises(ValueError, match="page size .* powers of two >= 16"):
    sda.paged_decode_attention(*_paged_case(page=8), platform="gpu", interpret=True)


def test_pow2():
  assert [platform_lib.pow2(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]
  assert platform_lib.pow2(3, 16) == 16


def _lowered_for_tpu(fn):
  return jax.jit(fn).trace().lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("g,page", [(3, 16), (8, 8), (1, 32)])
def test_paged_kernel_tpu_variant_matches_reference_in_tpu_interpret_mode(g, page):
  """Tables in SMEM, pages DMA'd from HBM two buffers deep, G padded to 8: simulated on CPU."""
  case = _paged_case(g=g, page=page, seed=g)
  ref = sda.paged_decode_attention_reference(*case, return_lse=True)
  out = sda.paged_decode_attention(*case, interpret=True, platform="tpu", return_lse=True)
  for a, r in zip(out, ref):
    assert a.shape == r.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-5)


def test_paged_kernel_lowers_for_tpu_through_mosaic():
  case = _paged_case()
  text = _lowered_for_tpu(lambda: sda.paged_decode_attention(*case, platform="tpu"))
  assert "tpu_custom_call" in text


@pytest.mark.parametrize("bits,g", [(2, 3), (4, 8), (8, 1)])
def test_quantized_kernel_tpu_variant_matches_reference_in_tpu_interpret_mode(bits, g):
  """Counts in SMEM, codes unpacked shift-major with the query and scales permuted to match."""
  case = _quant_case(bits, g=g)
  ref = qda.quantized_decode_attention_reference(**case, bits=bits, group=32, block=128,
                                                  return_lse=True)
  out = qda.quantized_decode_attention(**case, bits=bits, group=32, block=128, interpret=True,
                                       platform="tpu", return_lse=True)
  for a, r in zip(out, ref):
    assert a.shape == r.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_kernel_lowers_for_tpu_through_mosaic(bits):
  case = _quant_case(bits)
  text = _lowered_for_tpu(lambda: qda.quantized_decode_attention(
      **case, bits=bits, group=32, block=128, platform="tpu"))
  assert "tpu_custom_call" in text


@pytest.mark.parametrize("dtype,tau", [(jnp.float32, None), (jnp.bfloat16, None),
                                       (jnp.bfloat16, 1.0), (jnp.float32, 0.7)])
def test_column_sum_kernels_lower_for_gpu_through_triton(dtype, tau):
  """H2O's / Keyformer's fused column sums and the Gumbel row normaliser (hashed noise: uint32
  multiplies, shifts and xors in the kernel), at rows and slots that are not powers of two."""
  from kvlab.lib.gumbel import hash_salts  # pylint: disable=g-import-not-at-top
  from kvlab.pallas_kernels import column_sums as cs  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  b, k, r, s, h = 1, 3, 96, 200, 64
  q = jnp.asarray(rng.randn(b, k, r, h), dtype)
  keys = jnp.asarray(rng.randn(b, k, s, h), dtype)
  q_pos = jnp.asarray(rng.randint(0, 300, (b, k, r)), jnp.int32)
  k_pos = jnp.asarray(rng.randint(0, 300, (b, k, s)), jnp.int32)
  k_ok = jnp.asarray(rng.rand(b, k, s) > 0.3)
  salts = None if tau is None else hash_salts(0, 1, 2, q_pos, k_pos)
  kw = dict(tau=tau, salts=salts, platform="gpu", window=17)
  lse = jnp.zeros((b, k, r))
  for fn in (lambda: cs.column_sums(q, lse, q_pos, lse + 1.0, keys, k_pos, k_ok, **kw),
             lambda: cs.row_lse(q, q_pos, keys, k_pos, k_ok, **kw)):
    assert "xla.gpu.triton" in _lowered_for_cuda(fn)
