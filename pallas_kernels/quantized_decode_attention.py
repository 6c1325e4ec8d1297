"""One decode step of GQA attention over a KIVI-layout quantized cache (Pallas + jnp reference).

Layout (per batch row b and kv head k; ``w = 32 // bits`` codes per uint32 word):

* quantized part, ``S`` slots of which the first ``n_quant[b, k]`` are valid:
  - keys per channel (groups of ``group`` tokens): ``k_codes [B, K, S, H/w]``,
    ``k_scale, k_zero [B, K, S/group, H]``;
  - values per token (groups of ``group`` channels): ``v_codes [B, K, S, H/w]``,
    ``v_scale, v_zero [B, K, S, H/group]``;
* full-precision residual window of the most recent tokens: ``k_res, v_res [B, K, R, H]``, the
  first ``n_res[b, k]`` valid.

Keys are post-RoPE (KIVI), so a decode step needs no positions. Query ``q [B, K, G, H]`` holds
the G query heads sharing kv head k. Both functions return ``[B, K, G, H]`` float32.

The kernel's grid is (b, k, partition): the quantized part is split into ``partitions`` contiguous
runs of blocks (flash-decoding's split-K), and each program walks its run in blocks of ``block``
slots with an online softmax, unpacking and dequantizing each block in registers (the codes are the
only copy of the cache it reads); the last partition also folds in the residual window. Each program
writes its unnormalised output with its running max and normaliser, and a few jnp ops merge the
partitions (``outputs.merge_partitions``). On GPU the default splits until there are about two
programs per streaming multiprocessor: with one program per (b, k), as before, a batch-1 step of the
default model's 3 kv heads ran 3 programs on an H200's 132 SMs and took 1.78 ms at 32k
(``results/bench_decode_h200.json``), 11x slower than XLA's full-cache bf16 attention.

``interpret=True`` runs it on CPU (tests); on GPU it lowers through Triton
(``pallas_kernels.platform``: Triton's compiler parameters, the query group and the residual
window padded to powers of two) and on TPU through Mosaic (``quantized_decode_attention_tpu``,
one program per (b, k)). Tests lower both on the CPU and run the TPU one in TPU interpret mode;
``tests/test_quantized_decode_kernel.py`` runs compiled where JAX's backend is a GPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kvlab.pallas_kernels import packing, platform as platform_lib
from kvlab.pallas_kernels.kivi_block import dequantized_block
from kvlab.pallas_kernels.outputs import merge_partitions, partial_outputs
from kvlab.pallas_kernels.quantized_decode_attention_tpu import quantized_decode_attention_tpu

_NEG = -1e30
_EXACT = jax.lax.Precision.HIGHEST  # float32 products on GPU too (Triton would take TF32)


def _check(q, k_codes, k_scale, v_scale, k_res, bits, group, block):
  packing.check_bits(bits)
  b, k, g, h = q.shape
  w = packing.per_word(bits)
  if h % w:
    raise ValueError(f"head dim {h} is not a multiple of {w} codes per word at {bits} bits")
  s = k_codes.shape[2]
  if k_codes.shape != (b, k, s, h // w):
    raise ValueError(f"k_codes {k_codes.shape} != {(b, k, s, h // w)}")
  if s % group or h % group:
    raise ValueError(f"group {group} must divide the slots ({s}) and the head dim ({h})")
  if k_scale.shape != (b, k, s // group, h) or v_scale.shape != (b, k, s, h // group):
    raise ValueError(f"scales {k_scale.shape}, {v_scale.shape} do not match the codes")
  if block % group or s % block:
    raise ValueError(f"block {block} must be a multiple of group {group} and divide {s} slots")
  if k_res.shape[:2] != (b, k) or k_res.shape[3] != h:
    raise ValueError(f"residual {k_res.shape} does not match q {q.shape}")


def quantized_decode_attention_reference(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                                         n_quant, k_res, v_res, n_res, *, bits: int, group: int,
                                         block: int = 128, interpret: bool = False,
                                         return_lse: bool = False):
  """jnp reference (dequantize everything, one masked softmax). Same signature as the kernel."""
  del interpret
  _check(q, k_codes, k_scale, v_scale, k_res, bits, group, block)
  h = q.shape[-1]
  f32 = jnp.float32
  kq = packing.unpack(k_codes, bits).astype(f32)
  kq = kq * jnp.repeat(k_scale.astype(f32), group, 2) + jnp.repeat(k_zero.astype(f32), group, 2)
  vq = packing.unpack(v_codes, bits).astype(f32)
  vq = vq * jnp.repeat(v_scale.astype(f32), group, 3) + jnp.repeat(v_zero.astype(f32), group, 3)
  keys = jnp.concatenate([kq, k_res.astype(f32)], 2)  # [B, K, S + R, H]
  vals = jnp.concatenate([vq, v_res.astype(f32)], 2)
  s, r = k_codes.shape[2], k_res.shape[2]
  valid = jnp.concatenate([jnp.arange(s) < n_quant[..., None],
                           jnp.arange(r) < n_res[..., None]], -1)  # [B, K, S + R]
  logits = jnp.einsum("bkgh,bksh->bkgs", q.astype(f32), keys) / math.sqrt(h)
  logits = jnp.where(valid[:, :, None, :], logits, _NEG)
  p = jax.nn.softmax(logits, -1)
  p = jnp.where(valid[:, :, None, :], p, 0.0)
  out = jnp.einsum("bkgs,bksh->bkgh", p, vals)
  if not return_lse:
    return out
  m = logits.max(-1)
  l = jnp.where(valid[:, :, None, :], jnp.exp(logits - m[..., None]), 0.0).sum(-1)
  return out, jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), _NEG)


def _kernel(nq_ref, nr_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, kr_ref,
            vr_ref, acc_ref, m_ref, l_ref, *, bits, group, block, slots, per_part, dot_dtype):
  f32 = jnp.float32

  def dot(a, b):  # [M, C] x [C, N] -> [M, N] float32; operands in dot_dtype
    if dot_dtype == f32:
      return jnp.dot(a, b, precision=_EXACT)
    return jnp.dot(a.astype(dot_dtype), b.astype(dot_dtype), preferred_element_type=f32)

  q = q_ref[...].astype(f32)  # [G, H]
  h = q.shape[-1]
  w = 32 // bits
  shifts = jnp.arange(w, dtype=jnp.uint32) * bits
  mask = jnp.uint32((1 << bits) - 1)
  n_quant = nq_ref[0]
  n_res = nr_ref[0]
  inv = 1.0 / math.sqrt(h)
  part = pl.program_id(2)

  def codes(words):  # [T, H/w] uint32 -> [T, H] float
    c = (words[:, :, None] >> shifts[None, None, :]) & mask
    return c.reshape(words.shape[0], h).astype(f32)

  def fold(carry, logits, vals, valid):
    m, l, acc = carry
    logits = jnp.where(valid[None, :], logits, _NEG)
    m_new = jnp.maximum(m, logits.max(-1))
    p = jnp.where(valid[None, :], jnp.exp(logits - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    return m_new, l * alpha + p.sum(-1), acc * alpha[:, None] + dot(p, vals)

  def body(j, carry):
    t0, keys, vals = dequantized_block(
        j, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, block=block, group=group,
        codes=codes, per_channel=lambda x: jnp.repeat(x, group, 1))
    valid = t0 + jnp.arange(block) < n_quant
    return fold(carry, dot(q, keys.T) * inv, vals, valid)

  g = q.shape[0]
  carry = (jnp.full((g,), _NEG, f32), jnp.zeros((g,), f32), jnp.zeros((g, h), f32))
  n_blocks = jnp.minimum((n_quant + block - 1) // block, slots // block)  # skip invalid blocks
  start = part * per_part
  carry = jax.lax.fori_loop(start, jnp.minimum(start + per_part, n_blocks), body, carry)
  kr = kr_ref[...].astype(f32)  # [R, H]
  valid = (jnp.arange(kr.shape[0]) < n_res) & (part == pl.num_programs(2) - 1)
  m, l, acc = fold(carry, dot(q, kr.T) * inv, vr_ref[...].astype(f32), valid)
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("bits", "group", "block", "interpret", "return_lse",
                                             "platform", "partitions", "dot_dtype"))
def quantized_decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_quant,
                               k_res, v_res, n_res, *, bits: int, group: int, block: int = 128,
                               interpret: bool = False, return_lse: bool = False,
                               platform: str | None = None, partitions: int | None = None,
                               dot_dtype=jnp.float32):
  """Pallas kernel: see the module docstring for shapes. Returns ``[B, K, G, H]`` float32 (and, with
  ``return_lse``, each query's log normaliser ``[B, K, G]``, -1e30 if nothing is valid).
  ``platform``: what to lower for (None: JAX's default backend; ``"gpu"``: Triton; ``"tpu"``:
  Mosaic, and with ``interpret`` TPU interpret mode on CPU). ``partitions``: runs of blocks walked
  by separate programs and merged after (None: ``platform.default_partitions``; the TPU variant
  always walks one). ``dot_dtype``: operands of the two dots per block (float32: exact products,
  also on GPU; bfloat16: tensor-core dots accumulating in float32, about 3 significant digits per
  product, far below 2-/4-bit quantization error; the TPU variant computes in float32)."""
  _check(q, k_codes, k_scale, v_scale, k_res, bits, group, block)
  dot_dtype = jnp.dtype(dot_dtype)
  if dot_dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"dot_dtype must be float32 or bfloat16, got {dot_dtype}")
  platform_lib.check_lowerable(platform, interpret, "quantized_decode_attention", tpu=True)
  if platform_lib.target(platform) == "tpu":  # counts in SMEM, codes unpacked shift-major
    out, lse = quantized_decode_attention_tpu(
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_quant, k_res, v_res, n_res,
        bits=bits, group=group, block=block, interpret=interpret)
    return (out, lse) if return_lse else out
  b, k, g0, h = q.shape
  if platform_lib.gpu_padding(platform):  # Triton: power-of-two arrays, dots >= 16
    pow2 = platform_lib.pow2
    if block < 16 or block != pow2(block) or h < 16 or h != pow2(h) or group != pow2(group):
      raise ValueError(f"on GPU the block ({block}), head dim ({h}) and group ({group}) must "
                       "be powers of two, block and head dim >= 16")
    q = jnp.pad(q, ((0, 0), (0, 0), (0, pow2(g0, 16) - g0), (0, 0)))
    pad_r = ((0, 0), (0, 0), (0, pow2(k_res.shape[2], 16) - k_res.shape[2]), (0, 0))
    k_res, v_res = jnp.pad(k_res, pad_r), jnp.pad(v_res, pad_r)
  g = q.shape[2]
  s = k_codes.shape[2]
  r = k_res.shape[2]
  hw = k_codes.shape[3]
  n_blocks = s // block
  if partitions is None:
    partitions = platform_lib.default_partitions(b, k, n_blocks, platform, interpret)
  per_part, parts = platform_lib.split(n_blocks, partitions)
  row = lambda *tail: pl.BlockSpec((None, None) + tail,
                                   lambda i, j, p: (i, j) + (0,) * len(tail))
  out_specs, out_shape = partial_outputs(b, k, parts, g, h)
  kernel = functools.partial(_kernel, bits=bits, group=group, block=block, slots=s,
                             per_part=per_part, dot_dtype=dot_dtype)
  acc, m, l = pl.pallas_call(
      kernel,
      grid=(b, k, parts),
      in_specs=[row(1), row(1), row(g, h), row(s, hw), row(s // group, h), row(s // group, h),
                row(s, hw), row(s, h // group), row(s, h // group), row(r, h), row(r, h)],
      out_specs=out_specs,
      out_shape=out_shape,
      interpret=interpret,
      compiler_params=platform_lib.compiler_params(platform, interpret),
  )(n_quant.astype(jnp.int32)[..., None], n_res.astype(jnp.int32)[..., None], q, k_codes,
    k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res)
  out, lse = merge_partitions(acc, m, l, _NEG)
  if return_lse:
    return out[:, :, :g0], lse[:, :, :g0]
  return out[:, :, :g0]
