"""Attention column sums (H2O's accumulated attention) in one fused pass, nothing ``R x S`` stored.

Letters: B batch, K kv heads, R query rows of a kv head (its G query heads x T chunk queries),
S key slots, H head dim.

``col[b, k, s] = sum_r w[b, k, r] * exp(q[b, k, r] . keys[b, k, s] / sqrt(H) - lse[b, k, r])``
over the pairs attention allows: ``k_ok[b, k, s]`` (a valid slot), ``k_pos <= q_pos`` (causal)
and, with ``window``, ``q_pos - k_pos < window``. ``lse`` is each query's log normaliser from the
attention's own pass (``chunk_attention(return_lse=True)``), so ``exp(s - lse)`` is the exact
attention probability; ``w`` weights each row (H2O: 1 / G for a real query, 0 for padding).

Why a kernel: the XLA paths either keep every ``exp(s - m)`` block the attention formed and
re-read it (``R x S`` float32 written and read per layer) or recompute ``q . k`` and write the
scores again. Here a program owns one block of keys, walks the query rows block by block, and
reduces over the rows in registers: it reads ``q``, ``keys`` and ``lse`` and writes ``[S]``.
The hooks take it by default on one GPU for the plain sums (``lib.methods.accumulated.COLUMN_SUMS
= "auto"``; ``"kernel"`` forces it). On an H200 at 4k, bf16, it brought H2O's overhead from 63 %
of the prefill (kept probabilities) to 3.0 % (``results/bench_compress_twin_bf16_*_h200.json``).
Keyformer's path through it (``row_lse`` then the Gumbel column pass) measured 123 %, slower than
kept (87 %), so "auto" leaves Keyformer on kept; why it is slow has not been profiled. The
likely cause, the row pass running as few programs as there are row blocks (72 at that shape),
each walking every key block, is split over the key blocks since 2026-11-28 (``row_lse``'s
``partitions``), not yet timed on a GPU.

Keyformer's Gumbel-softmax takes the same pass over its own logits ``z = (s + G) / tau``, with
``G`` the hashed noise of ``lib.gumbel`` (a per-row and a per-slot uint32 salt, ``hash_salts``,
so the kernel computes the very noise the XLA paths add) and ``lse`` its own normaliser, which
``row_lse`` forms first (a row pass: programs own a block of query rows and a run of the key
blocks; the runs' online maxima and sums are merged after).

``column_sums_reference`` (dense jnp) and ``column_sums`` (Pallas) share the signature and return
``[B, K, S]`` float32; so do ``row_lse_reference`` and ``row_lse`` (``[B, K, R]``). ``interpret=True`` runs the kernel on CPU (tests); on GPU it lowers through
Triton (``pallas_kernels.platform``: rows and slots padded to powers of two). The dot runs in the
inputs' dtype with float32 accumulation: bf16 ``q``/``keys`` products are exact in float32, so a
bf16 model loses nothing to tensor cores; float32 inputs take exact float32 dots.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kvlab.pallas_kernels import platform as platform_lib
from kvlab.pallas_kernels.hash_noise import noise_of_hash

_EXACT = jax.lax.Precision.HIGHEST  # float32 products on GPU too (Triton would take TF32)
_NEG = -1e30


def _logits(s, row_salt, col_salt, tau):
  """``s [.., R, S]`` (scaled scores) -> the logits whose softmax is summed: ``s`` itself, or
  Keyformer's ``(s + G) / tau`` with ``G`` from the salts ``[.., R]`` and ``[.., S]``."""
  if tau is None:
    return s
  return (s + noise_of_hash(row_salt[..., :, None] ^ col_salt[..., None, :])) / tau


def _check(q, lse, q_pos, w, keys, k_pos, k_ok):
  b, k, r, h = q.shape
  s = keys.shape[2]
  if keys.shape != (b, k, s, h):
    raise ValueError(f"keys {keys.shape} must be [{b}, {k}, S, {h}] like q {q.shape}")
  for name, a, want in (("lse", lse, (b, k, r)), ("q_pos", q_pos, (b, k, r)),
                        ("w", w, (b, k, r)), ("k_pos", k_pos, (b, k, s)),
                        ("k_ok", k_ok, (b, k, s))):
    if a is not None and a.shape != want:
      raise ValueError(f"{name} {a.shape} must be {list(want)}")


def _allowed(q_pos, k_pos, k_ok, window):
  """``[..., R, S]`` pairs attention allows, from ``q_pos [..., R]``, ``k_pos, k_ok [..., S]``."""
  ok = k_ok[..., None, :] & (k_pos[..., None, :] <= q_pos[..., :, None])
  if window is not None:
    ok = ok & (q_pos[..., :, None] - k_pos[..., None, :] < window)
  return ok


def _salts(salts, q_pos, k_pos):
  """``(row [B, K, R], col [B, K, S])`` uint32 salts, zeros without Gumbel noise."""
  if salts is None:
    return jnp.zeros(q_pos.shape, jnp.uint32), jnp.zeros(k_pos.shape, jnp.uint32)
  row, col = salts
  if row.shape != q_pos.shape or col.shape != k_pos.shape:
    raise ValueError(f"salts {row.shape} / {col.shape} must be {list(q_pos.shape)} / "
                     f"{list(k_pos.shape)}")
  return row.astype(jnp.uint32), col.astype(jnp.uint32)


def _dense_logits(q, keys, salts, q_pos, k_pos, tau):
  s = jnp.einsum("BKRH,BKSH->BKRS", q.astype(jnp.float32), keys.astype(jnp.float32),
                 precision=_EXACT) / math.sqrt(q.shape[-1])
  return _logits(s, *_salts(salts, q_pos, k_pos), tau)


def column_sums_reference(q, lse, q_pos, w, keys, k_pos, k_ok, *, window: int | None = None,
                          tau: float | None = None, salts=None):
  """Dense jnp reference: q ``[B, K, R, H]``, lse / q_pos / w ``[B, K, R]``, keys ``[B, K, S, H]``,
  k_pos / k_ok ``[B, K, S]``; with ``tau`` Keyformer's logits, ``salts = (row [B, K, R], col
  [B, K, S])`` uint32 (``lib.gumbel.hash_salts``). Returns ``[B, K, S]`` float32 (see the module
  docstring)."""
  _check(q, lse, q_pos, w, keys, k_pos, k_ok)
  f32 = jnp.float32
  z = _dense_logits(q, keys, salts, q_pos, k_pos, tau)
  ok = _allowed(q_pos, k_pos, k_ok.astype(bool), window) & (w != 0)[..., None]
  p = jnp.where(ok, jnp.exp(z - lse[..., None]), 0.0)
  return jnp.einsum("BKR,BKRS->BKS", w.astype(f32), p, precision=_EXACT)


def row_lse_reference(q, q_pos, keys, k_pos, k_ok, *, window: int | None = None,
                      tau: float | None = None, salts=None):
  """Dense jnp reference of ``row_lse``: each row's log normaliser ``[B, K, R]`` of its logits
  over the keys it may attend to (0 for a row with none)."""
  z = _dense_logits(q, keys, salts, q_pos, k_pos, tau)
  ok = _allowed(q_pos, k_pos, k_ok.astype(bool), window)
  m = jnp.where(ok, z, _NEG).max(-1)
  l = jnp.where(ok, jnp.exp(z - m[..., None]), 0.0).sum(-1)
  return jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), 0.0)


def _scores(qb, keys, inv):
  """``[bq, H] x [bk, H] -> [bq, bk]`` float32 scaled scores: exact float32 dots, or the inputs'
  bf16 with a float32 accumulator (bf16 products are exact in it)."""
  if keys.dtype == jnp.float32:
    return jnp.dot(qb, keys.T, precision=_EXACT) * inv
  return jnp.dot(qb, keys.T, preferred_element_type=jnp.float32) * inv


def _column_kernel(q_ref, lse_ref, qp_ref, w_ref, rs_ref, k_ref, kp_ref, ko_ref, cs_ref, out_ref,
                   *, block_q, n_rows, window, tau):
  keys = k_ref[...]  # [bk, H], the inputs' dtype
  kpos, csalt = kp_ref[...], cs_ref[...]
  kok = ko_ref[...] != 0
  inv = 1.0 / math.sqrt(keys.shape[1])

  def body(i, col):
    rows = pl.ds(i * block_q, block_q)
    z = _logits(_scores(q_ref[rows, :], keys, inv), rs_ref[rows], csalt, tau)
    wb = w_ref[rows]
    ok = _allowed(qp_ref[rows], kpos, kok, window) & (wb != 0)[:, None]
    p = jnp.where(ok, jnp.exp(z - lse_ref[rows][:, None]), 0.0)
    return col + jnp.sum(p * wb[:, None], axis=0)

  # No valid slot in this block (the cache past its length, most of it early in a prefill):
  # nothing to sum, and no row block is visited.
  # Triton has no reduce_or, so an int max; and the trip count as an int32 product: a
  # jnp.where(flag, n, 0) of two Python ints was lowered for Triton as an i1 select, an upper
  # bound of another type than the loop's i32 lower bound (rejected when the H200 compiled it).
  any_valid = (jnp.max(ko_ref[...]) > 0).astype(jnp.int32)
  n_blocks = any_valid * jnp.int32(-(-n_rows // block_q))
  out_ref[...] = jax.lax.fori_loop(0, n_blocks, body, jnp.zeros(kpos.shape, jnp.float32))


def _row_kernel(q_ref, qp_ref, rs_ref, k_ref, kp_ref, ko_ref, cs_ref, m_ref, l_ref, *,
                block_k, n_slots, per_part, window, tau):
  """One program: a block of query rows over its partition's run of ``per_part`` key blocks
  (grid axis 3), an online max ``m`` and sum ``l`` of ``exp(z - m)``: ``row_lse`` merges the
  partitions' pairs."""
  qb = q_ref[...]  # [bq, H]
  qpos, rsalt = qp_ref[...], rs_ref[...]
  inv = 1.0 / math.sqrt(qb.shape[1])

  def body(j, carry):
    m, l = carry
    cols = pl.ds(j * block_k, block_k)
    z = _logits(_scores(qb, k_ref[cols, :], inv), rsalt, cs_ref[cols], tau)
    ok = _allowed(qpos, kp_ref[cols], ko_ref[cols] != 0, window)
    m_new = jnp.maximum(m, jnp.where(ok, z, _NEG).max(-1))
    e = jnp.where(ok, jnp.exp(z - m_new[:, None]), 0.0)
    return m_new, l * jnp.exp(m - m_new) + e.sum(-1)

  init = (jnp.full(qpos.shape, _NEG, jnp.float32), jnp.zeros(qpos.shape, jnp.float32))
  # int32 bounds throughout (a loop bound of another type fails Triton's verifier).
  first = pl.program_id(3).astype(jnp.int32) * jnp.int32(per_part)
  last = jnp.minimum(first + jnp.int32(per_part), jnp.int32(-(-n_slots // block_k)))
  m, l = jax.lax.fori_loop(first, last, body, init)
  m_ref[...], l_ref[...] = m, l


def _prepare(kernel, q, keys, q_pos, k_pos, k_ok, salts, platform, interpret, block_q, block_k,
             pow2_rows, pow2_slots):
  """A lowering for the platform (or one clear error naming ``kernel``), a common dtype for the
  dot, Triton's shape checks, and every input padded: rows to a multiple of ``block_q`` (on GPU
  with ``pow2_rows`` a power of two), slots likewise."""
  platform_lib.check_lowerable(platform, interpret, kernel)
  b, k, r, h = q.shape
  s = keys.shape[2]
  if keys.dtype != q.dtype:
    keys = keys.astype(jnp.promote_types(q.dtype, keys.dtype))
    q = q.astype(keys.dtype)
  rp = -(-r // block_q) * block_q
  sp = -(-s // block_k) * block_k
  if platform_lib.gpu_padding(platform):  # Triton: power-of-two arrays, dots >= 16
    if h < 16 or h != platform_lib.pow2(h) or block_q < 16 or block_k < 16 or \
        block_q != platform_lib.pow2(block_q) or block_k != platform_lib.pow2(block_k):
      raise ValueError(f"on GPU the head dim ({h}), block_q ({block_q}) and block_k "
                       f"({block_k}) must be powers of two >= 16")
    rp = platform_lib.pow2(rp) if pow2_rows else rp  # a program holding every row / slot
    sp = platform_lib.pow2(sp) if pow2_slots else sp  # loops only over the real ones
  row_salt, col_salt = _salts(salts, q_pos, k_pos)
  pad = lambda a, n, v: jnp.pad(a, ((0, 0), (0, 0), (0, n)) + ((0, 0),) * (a.ndim - 3),
                                constant_values=v)
  rows = dict(q=pad(q, rp - r, 0), q_pos=pad(q_pos.astype(jnp.int32), rp - r, -1),
              row_salt=pad(row_salt, rp - r, 0))
  slots = dict(keys=pad(keys, sp - s, 0), k_pos=pad(k_pos.astype(jnp.int32), sp - s, 0),
               k_ok=pad(k_ok.astype(jnp.int32), sp - s, 0), col_salt=pad(col_salt, sp - s, 0))
  return rows, slots, rp, sp


def _spec(size: int, follows_grid: bool):
  """BlockSpec maker for the grid ``(B, K, blocks)``: ``size`` entries of the third axis, the
  grid's block ``c`` of them (``follows_grid``) or the same first ``size`` for every program."""
  return lambda *tail: pl.BlockSpec(
      (None, None, size) + tail, lambda i, j, c: (i, j, c if follows_grid else 0) + (0,) * len(tail))


def _call(kernel, in_specs, out_spec, n_programs: int, out_len: int, args, interpret, platform):
  """``pallas_call`` over the grid ``(B, K, n_programs)``; a ``[B, K, out_len]`` float32 result."""
  b, k = args[0].shape[:2]
  return pl.pallas_call(
      kernel, grid=(b, k, n_programs), in_specs=in_specs, out_specs=out_spec,
      out_shape=jax.ShapeDtypeStruct((b, k, out_len), jnp.float32), interpret=interpret,
      compiler_params=platform_lib.compiler_params(platform, interpret))(*args)


@functools.partial(jax.jit, static_argnames=("window", "tau", "interpret", "platform", "block_q",
                                             "block_k"))
def column_sums(q, lse, q_pos, w, keys, k_pos, k_ok, *, window: int | None = None,
                tau: float | None = None, salts=None, interpret: bool = False,
                platform: str | None = None, block_q: int = 64, block_k: int = 64):
  """Pallas kernel: see the module docstring (arguments as ``column_sums_reference``).
  ``block_q`` rows per step of a program's loop, ``block_k`` key slots per program (grid
  ``(B, K, ceil(S / block_k))``). ``platform``: what to lower for (None: JAX's default
  backend; ``"gpu"``: Triton, and with ``interpret`` its padded shapes on CPU). Returns
  ``[B, K, S]`` float32."""
  _check(q, lse, q_pos, w, keys, k_pos, k_ok)
  rows, slots, rp, sp = _prepare("column_sums", q, keys, q_pos, k_pos, k_ok, salts, platform,
                                 interpret, block_q, block_k, pow2_rows=True, pow2_slots=False)
  r, h, s = q.shape[2], q.shape[3], keys.shape[2]
  pad_r = lambda a: jnp.pad(a.astype(jnp.float32), ((0, 0), (0, 0), (0, rp - r)))
  by_row, by_slot = _spec(rp, False), _spec(block_k, True)
  kernel = functools.partial(_column_kernel, block_q=block_q, n_rows=r, window=window, tau=tau)
  specs = [by_row(h), by_row(), by_row(), by_row(), by_row(), by_slot(h), by_slot(), by_slot(),
           by_slot()]
  args = (rows["q"], pad_r(lse), rows["q_pos"], pad_r(w), rows["row_salt"], slots["keys"],
          slots["k_pos"], slots["k_ok"], slots["col_salt"])
  return _call(kernel, specs, by_slot(), sp // block_k, sp, args, interpret, platform)[..., :s]


@functools.partial(jax.jit, static_argnames=("window", "tau", "interpret", "platform", "block_q",
                                             "block_k", "partitions"))
def row_lse(q, q_pos, keys, k_pos, k_ok, *, window: int | None = None, tau: float | None = None,
            salts=None, interpret: bool = False, platform: str | None = None,
            block_q: int = 64, block_k: int = 64, partitions: int | None = None):
  """Pallas kernel: each query row's log normaliser ``[B, K, R]`` float32 of its logits (the
  scores, or Keyformer's ``(s + G) / tau``) over the keys it may attend to, 0 for a row with
  none. Grid ``(B, K, ceil(R / block_q), partitions)``: each program walks one run of the key
  blocks with an online max and sum, and the runs' ``(m, l)`` are merged after (split-K).
  ``partitions``: None takes ``platform.default_partitions`` over the row blocks' programs
  (about two programs per streaming multiprocessor on GPU, 1 elsewhere). Before it, the row
  pass was ``B * K * R / block_q`` programs each walking every key block: 72 programs at the
  default model's shape and a 512-token chunk, the likely cause of Keyformer's slow kernel
  path on the H200 (untimed; ``experiments/bench_column_sums.py --row_partitions`` times both).
  Other arguments as ``column_sums``."""
  _check(q, None, q_pos, None, keys, k_pos, k_ok)
  rows, slots, rp, sp = _prepare("row_lse", q, keys, q_pos, k_pos, k_ok, salts, platform,
                                 interpret, block_q, block_k, pow2_rows=False, pow2_slots=True)
  b, k = q.shape[:2]
  r, h, s = q.shape[2], q.shape[3], keys.shape[2]
  n_blocks, n_row_blocks = -(-s // block_k), rp // block_q
  if partitions is None:
    partitions = platform_lib.default_partitions(b * n_row_blocks, k, n_blocks, platform,
                                                 interpret)
  per_part, parts = platform_lib.split(n_blocks, partitions)
  by_row = lambda *tail: pl.BlockSpec((None, None, block_q) + tail,
                                      lambda i, j, c, p: (i, j, c) + (0,) * len(tail))
  by_slot = lambda *tail: pl.BlockSpec((None, None, sp) + tail,
                                       lambda i, j, c, p: (i, j, 0) + (0,) * len(tail))
  part_out = pl.BlockSpec((None, None, None, block_q), lambda i, j, c, p: (i, j, p, c))
  kernel = functools.partial(_row_kernel, block_k=block_k, n_slots=s, per_part=per_part,
                             window=window, tau=tau)
  part_shape = jax.ShapeDtypeStruct((b, k, parts, rp), jnp.float32)
  m, l = pl.pallas_call(
      kernel, grid=(b, k, n_row_blocks, parts),
      in_specs=[by_row(h), by_row(), by_row(), by_slot(h), by_slot(), by_slot(), by_slot()],
      out_specs=(part_out, part_out), out_shape=(part_shape, part_shape), interpret=interpret,
      compiler_params=platform_lib.compiler_params(platform, interpret))(
          rows["q"], rows["q_pos"], rows["row_salt"], slots["keys"], slots["k_pos"],
          slots["k_ok"], slots["col_salt"])
  m_all = m.max(2)  # [B, K, rp]
  l_all = (l * jnp.exp(m - m_all[:, :, None])).sum(2)
  lse = jnp.where(l_all > 0, m_all + jnp.log(jnp.maximum(l_all, 1e-30)), 0.0)
  return lse[..., :r]
