"""The KIVI decode-attention kernel for TPU (Mosaic): same inputs and results as
``quantized_decode_attention.quantized_decode_attention``, laid out as Mosaic needs.

* ``n_quant`` and ``n_res`` go to SMEM as scalar prefetch (a ``[1]`` block per (b, k) is not a
  legal Mosaic block); every other input is a whole ``[S, ...]`` block per (b, k), so VMEM holds
  one head's codes and scales (2-bit codes of an 8k cache: 128 KiB).
* Unpacking without a lane interleave: the ``w`` codes of a word are shifted out as ``w`` arrays
  ``[T, H/w]`` and concatenated, which puts channel ``word * w + j`` at position
  ``j * H/w + word``. The wrapper permutes the query, the key scales and zero-points and the
  residual window the same way, so the scores are unchanged, and un-permutes the output. Value
  scales are per token and channel group; each group's scale is broadcast onto the positions of
  its channels.
* The query group is padded to a multiple of 8 rows; ``lse`` comes out ``[B, K, G, 1]``.

Tested on CPU in TPU interpret mode against the jnp reference and lowered for TPU; not yet
compiled or run on a TPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kvlab.pallas_kernels import platform as platform_lib
from kvlab.pallas_kernels.kivi_block import dequantized_block

_NEG = -1e30


def _permutation(h: int, bits: int) -> np.ndarray:
  """``perm[p]``: the channel at position ``p`` of the unpacked (shift-major) order."""
  hw = h // (32 // bits)
  pos = np.arange(h)
  return (pos % hw) * (32 // bits) + pos // hw


def _kernel(nq_ref, nr_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, kr_ref,
            vr_ref, o_ref, lse_ref, *, bits, group, block, slots, kv_heads):
  f32 = jnp.float32
  q = q_ref[...].astype(f32)  # [G, H], channels permuted
  g, h = q.shape
  w = 32 // bits
  mask = jnp.uint32((1 << bits) - 1)
  row = pl.program_id(0) * kv_heads + pl.program_id(1)
  n_quant = nq_ref[row]
  n_res = nr_ref[row]
  inv = 1.0 / math.sqrt(h)

  def codes(words):  # [T, H/w] uint32 -> [T, H] float, shift-major channel order
    return jnp.concatenate([((words >> jnp.uint32(j * bits)) & mask).astype(f32)
                            for j in range(w)], axis=1)

  pos = jax.lax.broadcasted_iota(jnp.int32, (1, h), 1)
  div, rem = jax.lax.div, jax.lax.rem  # truncating (all operands >= 0): no sign op for Mosaic
  group_of = div(rem(pos, h // w) * w + div(pos, h // w), group)  # channel group per position

  def per_channel(x):  # [T, H/group] value scales -> [T, H] at the permuted positions
    return sum(jnp.where(group_of == i, x[:, i:i + 1], 0.0)
               for i in range(x.shape[1]))

  def fold(carry, logits, vals, valid):
    m, l, acc = carry
    logits = jnp.where(valid, logits, _NEG)
    m_new = jnp.maximum(m, logits.max(-1, keepdims=True))
    p = jnp.where(valid, jnp.exp(logits - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    return (m_new, l * alpha + p.sum(-1, keepdims=True),
            acc * alpha + jnp.dot(p, vals, preferred_element_type=f32))

  def body(j, carry):
    t0, keys, vals = dequantized_block(
        j, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, block=block, group=group,
        codes=codes, per_channel=per_channel)
    valid = t0 + jax.lax.broadcasted_iota(jnp.int32, (g, block), 1) < n_quant
    logits = jnp.dot(q, keys.T, preferred_element_type=f32) * inv
    return fold(carry, logits, vals, valid)

  carry = (jnp.full((g, 1), _NEG, f32), jnp.zeros((g, 1), f32), jnp.zeros((g, h), f32))
  n_blocks = jnp.minimum(div(n_quant + block - 1, block), slots // block)
  carry = jax.lax.fori_loop(0, n_blocks, body, carry)
  kr = kr_ref[...].astype(f32)  # [R, H]
  valid = jax.lax.broadcasted_iota(jnp.int32, (g, kr.shape[0]), 1) < n_res
  m, l, acc = fold(carry, jnp.dot(q, kr.T, preferred_element_type=f32) * inv,
                   vr_ref[...].astype(f32), valid)
  o_ref[...] = (acc / jnp.maximum(l, 1e-30)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), _NEG)


def quantized_decode_attention_tpu(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                                   n_quant, k_res, v_res, n_res, *, bits: int, group: int,
                                   block: int, interpret: bool):
  """Shapes as ``quantized_decode_attention``. Returns ``(out [B, K, G, H], lse [B, K, G])``
  float32. ``interpret``: TPU interpret mode on CPU."""
  b, k, g0, h = q.shape
  s, hw = k_codes.shape[2:]
  r = k_res.shape[2]
  perm = _permutation(h, bits)
  g = -(-g0 // 8) * 8
  q = jnp.pad(q[..., perm], ((0, 0), (0, 0), (0, g - g0), (0, 0)))
  k_scale, k_zero, k_res, v_res = (x[..., perm] for x in (k_scale, k_zero, k_res, v_res))
  blk = lambda *tail: pl.BlockSpec((None, None) + tail, lambda i, j, *_: (i, j, 0, 0))
  kernel = functools.partial(_kernel, bits=bits, group=group, block=block, slots=s, kv_heads=k)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, k),
      in_specs=[blk(g, h), blk(s, hw), blk(s // group, h), blk(s // group, h), blk(s, hw),
                blk(s, h // group), blk(s, h // group), blk(r, h), blk(r, h)],
      out_specs=[blk(g, h), blk(g, 1)])
  out, lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, k, g, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, k, g, 1), jnp.float32)],
      **platform_lib.tpu_call_options(interpret),
  )(n_quant.astype(jnp.int32).reshape(-1), n_res.astype(jnp.int32).reshape(-1), q, k_codes,
    k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res)
  return out[:, :, :g0][..., np.argsort(perm)], lse[:, :, :g0, 0]
