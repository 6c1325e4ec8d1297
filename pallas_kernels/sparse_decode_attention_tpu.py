"""The paged decode-attention kernel for TPU (Mosaic): same inputs and results as
``sparse_decode_attention.paged_decode_attention``, laid out as Mosaic needs.

Mosaic blocks need their last two dimensions divisible by (8, 128) or whole, so a per-(b, k) row
of the page table cannot be a VMEM block. Here:

* the page table and the valid counts go to SMEM as scalar prefetch (flattened ``[B * K * M]``);
* the page pools stay in HBM (``pl.ANY``): each listed page is copied into a ``[P, H]`` VMEM
  buffer with a DMA, so VMEM holds two pages at a time, whatever the pool's size (the next
  page's copy starts before the current one is scored: two buffers per pool);
* the query group is padded to a multiple of 8 rows (sublanes); ``lse`` comes out as
  ``[B, K, G, 1]`` (a whole last dimension) and the wrapper reshapes it.

Tested on CPU in TPU interpret mode (``pltpu.InterpretParams``: DMAs and semaphores simulated)
against the jnp reference, and lowered for TPU; not yet compiled or run on a TPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kvlab.pallas_kernels import platform as platform_lib

_NEG = -1e30


def _kernel(pt_ref, pv_ref, q_ref, kp_hbm, vp_hbm, o_ref, lse_ref, kbuf, vbuf, sems, *,
            kv_heads: int, n_listed: int):
  f32 = jnp.float32
  q = q_ref[...].astype(f32)  # [G, H]
  g, h = q.shape
  p = kbuf.shape[1]
  inv = 1.0 / math.sqrt(h)
  base = (pl.program_id(0) * kv_heads + pl.program_id(1)) * n_listed

  def copies(j, slot):
    page = pt_ref[base + j]
    return (pltpu.make_async_copy(kp_hbm.at[page], kbuf.at[slot], sems.at[0, slot]),
            pltpu.make_async_copy(vp_hbm.at[page], vbuf.at[slot], sems.at[1, slot]))

  # Listed entries come first (to_pages / select_blocks order them so): stop at the last one.
  n_used = jax.lax.fori_loop(0, n_listed, lambda j, n: n + (pv_ref[base + j] > 0).astype(
      jnp.int32), jnp.int32(0))

  @pl.when(n_used > 0)
  def _():
    for c in copies(0, 0):
      c.start()

  def body(j, carry):
    m, l, acc = carry
    slot = j % 2

    @pl.when(j + 1 < n_used)
    def _():
      for c in copies(j + 1, 1 - slot):
        c.start()

    for c in copies(j, slot):
      c.wait()
    keys = kbuf[slot].astype(f32)  # [P, H]
    vals = vbuf[slot].astype(f32)
    valid = jax.lax.broadcasted_iota(jnp.int32, (g, p), 1) < pv_ref[base + j]
    s = jnp.where(valid, jnp.dot(q, keys.T, preferred_element_type=f32) * inv, _NEG)
    m_new = jnp.maximum(m, s.max(-1, keepdims=True))
    e = jnp.where(valid, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    return (m_new, l * alpha + e.sum(-1, keepdims=True),
            acc * alpha + jnp.dot(e, vals, preferred_element_type=f32))

  carry = (jnp.full((g, 1), _NEG, f32), jnp.zeros((g, 1), f32), jnp.zeros((g, h), f32))
  m, l, acc = jax.lax.fori_loop(0, n_used, body, carry)
  o_ref[...] = (acc / jnp.maximum(l, 1e-30)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), _NEG)


def paged_decode_attention_tpu(q, k_pages, v_pages, page_table, page_valid, *, interpret: bool):
  """``q [B, K, G, H]``, pools ``[N, P, H]``, ``page_table, page_valid [B, K, M]`` ->
  ``(out [B, K, G, H], lse [B, K, G])`` float32. ``interpret``: TPU interpret mode on CPU."""
  b, k, g0, h = q.shape
  _, p, _ = k_pages.shape
  mm = page_table.shape[2]
  g = -(-g0 // 8) * 8
  q = jnp.pad(q, ((0, 0), (0, 0), (0, g - g0), (0, 0)))
  blk = lambda *tail: pl.BlockSpec((None, None) + tail, lambda i, j, *_: (i, j, 0, 0))
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, k), in_specs=[blk(g, h), hbm, hbm],
      out_specs=[blk(g, h), blk(g, 1)],
      scratch_shapes=[pltpu.VMEM((2, p, h), k_pages.dtype), pltpu.VMEM((2, p, h), v_pages.dtype),
                      pltpu.SemaphoreType.DMA((2, 2))])
  out, lse = pl.pallas_call(
      functools.partial(_kernel, kv_heads=k, n_listed=mm),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, k, g, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, k, g, 1), jnp.float32)],
      **platform_lib.tpu_call_options(interpret),
  )(page_table.astype(jnp.int32).reshape(-1), page_valid.astype(jnp.int32).reshape(-1), q,
    k_pages, v_pages)
  return out[:, :, :g0], lse[:, :, :g0, 0]
