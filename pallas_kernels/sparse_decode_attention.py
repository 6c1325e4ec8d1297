"""One decode step of GQA attention over pages: ragged caches and block-selected reads.

Letters: B batch, K kv heads, G query heads per kv head, H head dim, P slots per page, M pages
listed per (b, k), N pages in the pool.

Layout: keys and values live in a pool of pages ``k_pages, v_pages [N, P, H]``; each (b, k)
lists its pages in ``page_table [B, K, M]`` (int32 pool indices) with ``page_valid [B, K, M]``
tokens valid in each (the first ones of the page; 0 = the entry is unused). Two uses:

* **ragged caches** (AdaKV / PyramidKV budgets): every head stores only the pages its own budget
  needs (``to_pages``), instead of padding every head to the largest budget;
* **block selection** (retrieval-style methods): the pool is a full cache viewed as pages
  (``as_pages``, no copy) and the table lists the top-scoring blocks of each head
  (``select_blocks``), so a step reads only those.

``paged_decode_attention`` (Pallas: programs per (b, k) and run of listed pages, split-K like
``quantized_decode_attention``, each an online softmax over its pages, skipping unused entries,
merged after) and ``paged_decode_attention_reference`` (jnp gather + masked softmax)
share the signature and return ``[B, K, G, H]`` float32; a head with no valid token returns 0.
With ``return_lse=True`` both also return each query's log normaliser ``lse [B, K, G]`` (of the
logits ``q.k / sqrt(H)`` over the listed tokens; -1e30 for an empty head), so a caller can fold the
result into an online softmax over other keys (``lib.attention`` does, for the decode step).
``interpret=True`` runs the kernel on CPU (tests); on GPU it lowers through Triton
(``pallas_kernels.platform``: Triton's compiler parameters, the query group and the page list
padded to powers of two) and on TPU through Mosaic (``sparse_decode_attention_tpu``: tables in
SMEM, pages copied by DMA). Tests lower both on the CPU and run the TPU one in TPU interpret
mode; ``tests/test_sparse_decode_kernel.py`` runs compiled where JAX's backend is a GPU (on an
H200, before split-K: equal to the reference, and 5.00 vs 5.16 ms for padded XLA over 30 layers
of a 4k AdaKV cache, ``results/bench_sparse_decode_twin_h200.json``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kvlab.pallas_kernels import platform as platform_lib
from kvlab.pallas_kernels.outputs import merge_partitions, partial_outputs
from kvlab.pallas_kernels.sparse_decode_attention_tpu import paged_decode_attention_tpu

_NEG = -1e30
_EXACT = jax.lax.Precision.HIGHEST  # float32 products on GPU too (Triton would take TF32)


def _check(q, k_pages, v_pages, page_table, page_valid):
  b, k, g, h = q.shape
  if k_pages.shape != v_pages.shape or k_pages.ndim != 3 or k_pages.shape[2] != h:
    raise ValueError(f"pages {k_pages.shape} / {v_pages.shape} must both be [N, P, {h}]")
  if page_table.shape[:2] != (b, k) or page_valid.shape != page_table.shape:
    raise ValueError(f"page_table {page_table.shape} and page_valid {page_valid.shape} must be "
                     f"[{b}, {k}, M]")


def paged_decode_attention_reference(q, k_pages, v_pages, page_table, page_valid, *,
                                     return_lse: bool = False):
  """jnp reference: gathers each head's listed pages and runs a masked softmax."""
  _check(q, k_pages, v_pages, page_table, page_valid)
  b, k, g, h = q.shape
  p = k_pages.shape[1]
  f32 = jnp.float32
  keys = k_pages[page_table].astype(f32).reshape(b, k, -1, h)  # [B, K, M*P, H]
  vals = v_pages[page_table].astype(f32).reshape(b, k, -1, h)
  valid = (jnp.arange(p) < page_valid[..., None]).reshape(b, k, -1)  # [B, K, M*P]
  s = jnp.einsum("BKGH,BKSH->BKGS", q.astype(f32), keys) / math.sqrt(h)
  s = jnp.where(valid[:, :, None, :], s, _NEG)
  m = s.max(-1, keepdims=True)
  e = jnp.where(valid[:, :, None, :], jnp.exp(s - m), 0.0)
  l = e.sum(-1, keepdims=True)
  out = jnp.einsum("BKGS,BKSH->BKGH", e, vals) / jnp.maximum(l, 1e-30)
  if not return_lse:
    return out
  return out, jnp.where(l[..., 0] > 0, m[..., 0] + jnp.log(jnp.maximum(l[..., 0], 1e-30)), _NEG)


def _kernel(pt_ref, pv_ref, q_ref, kp_ref, vp_ref, acc_ref, m_ref, l_ref, *, n_listed,
            per_part):
  f32 = jnp.float32
  q = q_ref[...].astype(f32)  # [G, H]
  g, h = q.shape
  p = kp_ref.shape[1]
  inv = 1.0 / math.sqrt(h)

  def body(j, carry):
    m, l, acc = carry
    page = pt_ref[j]
    n_valid = pv_ref[j]
    keys = kp_ref[pl.ds(page, 1), :, :].reshape(p, h).astype(f32)
    vals = vp_ref[pl.ds(page, 1), :, :].reshape(p, h).astype(f32)
    valid = jnp.arange(p) < n_valid
    s = jnp.where(valid[None, :], jnp.dot(q, keys.T, precision=_EXACT) * inv, _NEG)
    m_new = jnp.maximum(m, s.max(-1))
    e = jnp.where(valid[None, :], jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    return m_new, l * alpha + e.sum(-1), acc * alpha[:, None] + jnp.dot(e, vals,
                                                                        precision=_EXACT)

  carry = (jnp.full((g,), _NEG, f32), jnp.zeros((g,), f32), jnp.zeros((g, h), f32))
  # listed entries come first (to_pages / select_blocks order them so): stop at the last one;
  # this program walks entries [start, start + per_part) of them (split-K)
  n_used = jnp.minimum(jnp.sum((pv_ref[...] > 0).astype(jnp.int32)), n_listed)
  start = pl.program_id(2) * per_part
  m, l, acc = jax.lax.fori_loop(start, jnp.minimum(start + per_part, n_used), body, carry)
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("interpret", "return_lse", "platform",
                                             "partitions"))
def paged_decode_attention(q, k_pages, v_pages, page_table, page_valid, *,
                           interpret: bool = False, return_lse: bool = False,
                           platform: str | None = None, partitions: int | None = None):
  """Pallas kernel: see the module docstring. Listed pages must come before unused entries.
  ``platform``: what to lower for (None: JAX's default backend; ``"gpu"``: Triton; ``"tpu"``:
  Mosaic, and with ``interpret`` TPU interpret mode on CPU). ``partitions``: runs of table
  entries walked by separate programs and merged after (None: ``platform.default_partitions``,
  several only on GPU; the TPU variant always walks one)."""
  _check(q, k_pages, v_pages, page_table, page_valid)
  platform_lib.check_lowerable(platform, interpret, "paged_decode_attention", tpu=True)
  if platform_lib.target(platform) == "tpu":  # tables in SMEM, pages copied from HBM by DMA
    out, lse = paged_decode_attention_tpu(q, k_pages, v_pages, page_table, page_valid,
                                          interpret=interpret)
    return (out, lse) if return_lse else out
  b, k, g0, h = q.shape
  n, p, _ = k_pages.shape
  if platform_lib.gpu_padding(platform):  # Triton: power-of-two arrays, dots >= 16
    if p < 16 or p != platform_lib.pow2(p) or h < 16 or h != platform_lib.pow2(h):
      raise ValueError(f"on GPU the page size ({p}) and head dim ({h}) must be powers of two "
                       ">= 16: build the pages with page=16 (lib.paged)")
    g = platform_lib.pow2(g0, 16)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, g - g0), (0, 0)))
    pad_m = ((0, 0), (0, 0), (0, platform_lib.pow2(page_table.shape[2]) - page_table.shape[2]))
    page_table, page_valid = jnp.pad(page_table, pad_m), jnp.pad(page_valid, pad_m)
  g, mm = q.shape[2], page_table.shape[2]
  if partitions is None:
    partitions = platform_lib.default_partitions(b, k, mm, platform, interpret)
  per_part, parts = platform_lib.split(mm, partitions)
  row = lambda *tail: pl.BlockSpec((None, None) + tail,
                                   lambda i, j, p: (i, j) + (0,) * len(tail))
  pool = pl.BlockSpec((n, p, h), lambda i, j, p: (0, 0, 0))
  out_specs, out_shape = partial_outputs(b, k, parts, g, h)
  acc, m, l = pl.pallas_call(
      functools.partial(_kernel, n_listed=mm, per_part=per_part),
      grid=(b, k, parts),
      in_specs=[row(mm), row(mm), row(g, h), pool, pool],
      out_specs=out_specs,
      out_shape=out_shape,
      interpret=interpret,
      compiler_params=platform_lib.compiler_params(platform, interpret),
  )(page_table.astype(jnp.int32), page_valid.astype(jnp.int32), q, k_pages, v_pages)
  out, lse = merge_partitions(acc, m, l, _NEG)
  if return_lse:
    return out[:, :, :g0], lse[:, :, :g0]
  return out[:, :, :g0]


# ---- layouts -----------------------------------------------------------------------------------

def to_pages(keys, values, lengths, page: int):
  """Ragged storage of one layer: ``keys, values [B, K, S, H]`` whose heads hold ``lengths
  [B, K]`` valid slots (host-level: the pool size depends on the lengths). Returns
  ``(k_pages, v_pages [N, P, H], page_table, page_valid [B, K, M])`` with ``N = sum over heads of
  ceil(length / P)`` (at least one page, so the pool is never empty) and ``M`` the most pages
  any head needs."""
  lengths = np.asarray(lengths)
  b, k, s, h = keys.shape
  need = -(-lengths // page)  # pages per head
  m = max(int(need.max()), 1)
  n = max(int(need.sum()), 1)
  pad = -s % page
  kp = jnp.pad(keys, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b * k * ((s + pad) // page), page, h)
  vp = jnp.pad(values, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(kp.shape)
  per_head = (s + pad) // page
  src, table = [], np.zeros((b, k, m), np.int32)
  valid = np.zeros((b, k, m), np.int32)
  for i in range(b):
    for j in range(k):
      for t in range(int(need[i, j])):
        table[i, j, t] = len(src)
        src.append((i * k + j) * per_head + t)
        valid[i, j, t] = min(page, int(lengths[i, j]) - t * page)
  src = jnp.asarray(src if src else [0], jnp.int32)
  return kp[src][:n], vp[src][:n], jnp.asarray(table), jnp.asarray(valid)


def as_pages(keys, values, page: int):
  """A full cache layer ``[B, K, S, H]`` (``S`` a multiple of ``page``) viewed as a pool of
  ``B * K * S / P`` pages (a reshape, no copy); page ``(b * K + k) * S / P + i`` is block i of
  head (b, k)."""
  b, k, s, h = keys.shape
  if s % page:
    raise ValueError(f"{s} slots do not split into pages of {page}: pad the cache to a multiple")
  return keys.reshape(-1, page, h), values.reshape(-1, page, h)


def select_blocks(q, keys, lengths, page: int, n_blocks: int):
  """Block selection over a full cache layer (jittable): scores each block of ``page`` slots of
  every head by the largest ``q . k`` over its keys and its G queries, keeps the ``n_blocks``
  best valid blocks (the newest block is always kept). Returns ``(page_table, page_valid
  [B, K, n_blocks])`` into ``as_pages(keys, ...)``."""
  b, k, s, h = keys.shape
  nb = s // page
  f32 = jnp.float32
  kb = keys.astype(f32).reshape(b, k, nb, page, h)
  slot = jnp.arange(s).reshape(nb, page)
  ok = slot[None, None] < lengths[..., None, None]  # [B, K, nb, P]
  sc = jnp.einsum("BKGH,BKNPH->BKGNP", q.astype(f32), kb).max(2)  # [B, K, nb, P]
  sc = jnp.where(ok, sc, _NEG).max(-1)  # [B, K, nb]
  n_valid_blocks = -(-lengths // page)
  newest = jnp.maximum(n_valid_blocks - 1, 0)
  sc = jnp.where(jnp.arange(nb) == newest[..., None], jnp.inf, sc)
  sc = jnp.where(jnp.arange(nb) < n_valid_blocks[..., None], sc, -jnp.inf)
  _, idx = jax.lax.top_k(sc, n_blocks)  # best first; invalid blocks last
  tok = jnp.clip(lengths[..., None] - idx * page, 0, page)  # valid tokens of each chosen block
  base = (jnp.arange(b)[:, None] * k + jnp.arange(k)[None, :]) * nb
  return (base[..., None] + idx).astype(jnp.int32), tok.astype(jnp.int32)
