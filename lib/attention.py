"""Reference (XLA/jnp) attention of a chunk of new tokens over the cache plus themselves.

Axis letters: B batch, T new tokens (queries), N query heads, K kv heads, G = N // K query heads
per kv head, S cache slots, H head dim.

One function serves prefill (T = chunk) and decode (T = 1). It never materialises a T x S or
S x S score matrix for the whole cache: the cache is read in blocks of ``block_size`` slots
with an online softmax (running max ``m``, normaliser ``l`` and accumulator ``acc``), and the
loop stops at the longest valid length, so unused capacity is not read. Peak memory is
O(T * block_size) per head.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from kvlab.lib.gumbel import gumbel_noise, gumbel_weight, query_head_ids

_NEG = -1e30  # finite "minus infinity": keeps fully masked blocks NaN-free

# A decode step (T = 1) reads each cache block once: its keys are copied out of the stacked
# cache and fed to two small batched dots. Blocks that stay in a core's L2 cache make that copy
# nearly free; larger ones go through memory twice. Measured on the 2-core CPU (SmolLM2, 2k
# cache, 16 decoded tokens, interleaved runs): batch 8 takes 290 ms per step with 128-slot
# blocks vs 478 ms with 512 (1.6x); batch 1, whose 512-slot block is 0.4 MiB, is 84 ms at 512
# vs 90-104 ms at 128. So a decode step's block holds at most this many key bytes.
DECODE_BLOCK_BYTES = 1 << 20


def decode_block_size(block_size: int, batch: int, kv_heads: int, head_dim: int,
                      capacity: int | None = None) -> int:
  """Cache slots per online-softmax block for one decode step (T = 1): ``block_size``, halved
  (not below 64) until one block of float32 keys ``[B, K, block, H]`` is at most
  ``DECODE_BLOCK_BYTES``. Prefill chunks keep ``block_size``.

  With the cache's ``capacity``: the fewest blocks of at most that many bytes (or that many
  slots, if more) that cover it, evenly sized to a multiple of 8, so a 544-slot cache is read as
  one block and not as 512 slots plus a second, overlapping 512. Measured on the 2-core CPU
  with the default model's heads and tiny weights, 512 tokens cached: 5.4 vs 8.3 ms a token
  (``experiments/bench_cpu_floors.py``, part ``decode``)."""
  per_slot = batch * kv_heads * head_dim * 4
  bs = block_size
  while bs > 64 and bs * per_slot > DECODE_BLOCK_BYTES:
    bs //= 2
  if capacity is None:
    return bs
  most = max(bs, DECODE_BLOCK_BYTES // per_slot)  # slots a block may hold
  n = -(-capacity // most)
  even = -(-capacity // n)  # ceil(capacity / n), then up to a multiple of 8 (not below 64)
  return min(capacity, max(-(-even // 8) * 8, 64))


def _window_ok(q_pos, k_pos, sliding_window):
  """``q_pos [..., T, 1]`` vs ``k_pos [..., 1, S]`` -> bool: key inside the sliding window."""
  if sliding_window is None:
    return True
  return (q_pos - k_pos) < sliding_window


def chunk_attention(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    cache_k: jax.Array,
    cache_v: jax.Array,
    cache_positions: jax.Array,
    cache_lengths: jax.Array,
    q_positions: jax.Array,
    *,
    layer: jax.Array | None = None,
    sliding_window: int | None = None,
    block_size: int = 512,
    quant: Any = None,
    return_lse: bool = False,
    static_trip: bool = False,
    impl: str = "xla",
    return_probs: bool = False,
    gumbel_probs: tuple[float, int] | None = None,
):
  """Causal GQA attention of T new tokens over the cache and over themselves.

  Args:
    q: ``[B, T, N, H]`` post-RoPE queries.
    k_new, v_new: ``[B, K, T, H]`` keys/values of the same T tokens (not yet in the cache).
    cache_k, cache_v: ``[B, K, S, H]`` cached keys/values (any capacity S). With ``layer``
      given, the stacked ``[L, B, K, S, H]`` arrays.
    cache_positions: ``[B, K, S]`` (or ``[L, B, K, S]``) original positions of cached tokens.
    cache_lengths: ``[B, K]`` (or ``[L, B, K]``) valid slots per head; the rest is ignored.
    q_positions: ``[B, T]`` positions of the new tokens.
    layer: index into the leading layer axis of the cache arrays. Inside a layer scan, pass
      the whole stacked cache and the index: only the blocks read are sliced out, whereas
      scanning over per-layer slices makes XLA copy every layer's cache on every step.
    sliding_window: keys with ``q_pos - k_pos >= sliding_window`` are masked (Mistral). An int,
      or a traced int32 scalar: a hybrid model's (Gemma 3) per-layer window inside the layer
      scan (its global layers pass one no distance reaches); Pallas kernels then do not apply.
    block_size: cache slots per online-softmax block (a decode step, T = 1, may use fewer:
      ``decode_block_size``).
    quant: the cache's stored part (``KVCache.quant``: packed codes, low-rank factors or
      pruned channels; stacked over layers; needs ``layer``): older tokens read block by block
      (``read``) and folded into the same online softmax.
    return_lse: also return each query's log normaliser ``lse [B, K, G, T]`` (of the logits
      ``q.k / sqrt(H)`` over every key it attends to), so observation hooks can form exact
      attention probabilities ``exp(s - lse)`` block by block without a second softmax.
    static_trip: loop over every block of the capacity (masked past the valid length) instead
      of stopping at the longest valid length: slower, but reverse-mode differentiable.
    impl: ``"xla"`` (blockwise jnp, any backend), ``"pallas"`` or ``"interpret"`` (the Pallas
      kernel, compiled or in interpret mode for CPU tests) for the stored part of a decode step
      (T = 1) when the store has a kernel (``kernel_attention``: paged AdaKV/PyramidKV pages,
      KIVI codes) and no sliding window applies; everything else takes the XLA path.
    return_probs: also return the attention probabilities as the online softmax formed them
      (``KeptProbs``: each block's ``exp(s - m)`` with its running max ``m``, and ``lse``), so
      hooks get exact probabilities ``exp(s - m) * exp(m - lse)`` (H2O's column sums) without
      recomputing ``q.k``. Costs a ``[B, K, G, T, S]`` float32 buffer. Needs a plain cache.
    gumbel_probs: ``(tau, seed)``: also keep Keyformer's Gumbel-softmax probabilities
      ``softmax((s + G) / tau)`` formed in the same pass (``G = gumbel_noise(seed, layer,
      query head, query position, key position)``, the noise of the Keyformer hook's own pass),
      as a second ``KeptProbs`` with its own running max and ``lse``. The attention output is
      unchanged. Costs another ``[B, K, G, T, S]`` buffer; needs a plain cache and ``layer``.

  Returns:
    ``[B, T, N, H]`` attention outputs in ``q.dtype``, then ``lse`` with ``return_lse``, then
    a ``KeptProbs`` with ``return_probs``, then the Gumbel one with ``gumbel_probs``.
  """
  if (return_probs or gumbel_probs is not None) and quant is not None:
    raise ValueError("return_probs / gumbel_probs need a plain cache (quant is None)")
  b, t, n, h = q.shape
  kh = k_new.shape[1]
  g = n // kh
  f32 = jnp.float32
  qg = (q.astype(f32) * (1.0 / math.sqrt(h))).reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)
  qpos = q_positions[:, None, None, :, None]  # [B, 1, 1, T, 1]

  # 1) The new tokens attend to themselves causally. The diagonal is always allowed, so every
  #    query row gets a finite running max before any cache block is read.
  keep_probs = return_probs or gumbel_probs is not None
  if not keep_probs and t >= 2 * SELF_ROWS and t % SELF_ROWS == 0:
    by_rows = lambda rows: lambda: _causal_self(qg, k_new, v_new, q_positions, sliding_window,
                                                rows)
    m, l, acc = jax.lax.platform_dependent(cpu=by_rows(SELF_ROWS), default=by_rows(t))
  else:
    s = jnp.einsum("BKGTH,BKSH->BKGTS", qg, k_new.astype(f32))
    causal = jnp.tril(jnp.ones((t, t), bool))
    mask = causal & _window_ok(qpos, q_positions[:, None, None, None, :], sliding_window)
    s = s + _mask_bias(mask)
    m = s.max(-1)  # [B, K, G, T]
    p = jnp.exp(s - m[..., None])  # exactly 0 where masked (see _mask_bias)
    l = p.sum(-1)
    acc = jnp.einsum("BKGTS,BKSH->BKGTH", p, v_new.astype(f32))
    p_self, m_self = p, m
  if gumbel_probs is not None:  # Keyformer's perturbed logits of the same scores
    tau, seed = gumbel_probs
    layer_id = jnp.int32(0) if layer is None else layer
    heads = query_head_ids(kh, g)[None, :, :, None, None]
    noisy = lambda sb, kpos: (sb + gumbel_noise(seed, layer_id, heads, qpos, kpos)) / tau
    weight = lambda kpos: gumbel_weight(seed, layer_id, heads, qpos, kpos)
    self_kpos = q_positions[:, None, None, None, :]
    if tau == 1.0:  # exp(s + G - m) = exp(s - m) exp(G): reuse the softmax's terms and max
      gm_self, gp_self = m, p * weight(self_kpos)
    else:
      gz = jnp.where(mask, noisy(s, self_kpos), _NEG)
      gm_self = gz.max(-1)  # [B, K, G, T]: the diagonal is always allowed
      gp_self = jnp.where(mask, jnp.exp(gz - gm_self[..., None]), 0.0)
    gumbel_carry = (gm_self, gp_self.sum(-1))

  # 2) Cached blocks with an online softmax, up to the longest valid length.
  if layer is None:
    cache_k, cache_v, cache_positions, cache_lengths = jax.tree.map(
        lambda x: x[None], (cache_k, cache_v, cache_positions, cache_lengths))
    layer = 0
  cache_lengths = jax.lax.dynamic_index_in_dim(cache_lengths, layer, 0, keepdims=False)  # [B, K]
  s_cap = cache_k.shape[3]
  if t == 1 and not keep_probs:
    block_size = decode_block_size(block_size, b, kh, h, capacity=s_cap)
  bs = min(block_size, s_cap)
  n_blocks = -(-s_cap // bs) if static_trip else (jnp.max(cache_lengths) + bs - 1) // bs

  def body(i, carry):
    kb, pb, valid = cache_block(cache_k, cache_positions, cache_lengths, layer, i, bs)
    vb = cache_block(cache_v, None, None, layer, i, bs)
    valid = valid[:, :, None, None, :] & _window_ok(qpos, pb[:, :, None, None, :],
                                                    sliding_window)  # [B, K, 1|G, 1|T, bs]
    if not keep:
      return _fold(carry, qg, kb.astype(f32), vb.astype(f32), valid)
    mla, kept, gkept = carry  # keep each block's exp(s - m) and its m for the column sums
    sb = block_scores(qg, kb.astype(f32))
    mla, p = _fold(mla, qg, None, vb.astype(f32), valid, return_p=True, scores=sb)
    if kept is not None:
      kept = (kept[0].at[i].set(p), kept[1].at[i].set(mla[0]))
    if gkept is not None:  # the same block's Gumbel-softmax terms
      (gm, gl), gp_buf, gm_buf = gkept
      kpos = pb[:, :, None, None, :]
      if gumbel_probs[0] == 1.0:  # the softmax's own running max and terms, reweighted
        gm_new, gp = mla[0], p * weight(kpos)
      else:  # their own running max
        z = jnp.where(valid, noisy(sb, kpos), _NEG)
        gm_new = jnp.maximum(gm, z.max(-1))
        gp = jnp.where(valid, jnp.exp(z - gm_new[..., None]), 0.0)
      gkept = ((gm_new, gl * jnp.exp(gm - gm_new) + gp.sum(-1)), gp_buf.at[i].set(gp),
               gm_buf.at[i].set(gm_new))
    return mla, kept, gkept

  keep = return_probs or gumbel_probs is not None
  if keep:
    nb_cap = -(-s_cap // bs)
    # Each block's terms and running max. Only the n_blocks read are written, and readers
    # (KeptProbs) stop there too; uninitialised buffers (jax.lax.empty) measured slower on
    # CPU all the same (h2o at 4k: 43 % overhead vs 22 % with zeros, run back to back).
    bufs = lambda: (jnp.zeros((nb_cap, b, kh, g, t, bs), f32),
                    jnp.zeros((nb_cap, b, kh, g, t), f32))
    carry = ((m, l, acc), bufs() if return_probs else None,
             (gumbel_carry,) + bufs() if gumbel_probs is not None else None)
    (m, l, acc), kept, gkept = jax.lax.fori_loop(0, n_blocks, body, carry)
  else:
    m, l, acc = jax.lax.fori_loop(0, n_blocks, body, (m, l, acc))
  if quant is not None and impl != "xla" and _kernel_reads(quant, t, sliding_window, static_trip):
    q1 = q.astype(f32).reshape(b, kh, g, h)  # the one new token's queries, [B, K, G, H]
    m, l, acc = _kernel_blocks(quant, layer, q1, impl, (m, l, acc))
  elif quant is not None:
    m, l, acc = _quantized_blocks(quant, layer, qg, qpos, sliding_window, block_size, (m, l, acc))
  out = acc / l[..., None]  # [B, K, G, T, H]
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
  lse = m + jnp.log(l)
  result = (out,) + ((lse,) if return_lse else ())
  if return_probs:
    result += (KeptProbs(p_self, m_self, kept[0], kept[1], n_blocks, bs, lse),)
  if gumbel_probs is not None:
    (gm, gl), gp_buf, gm_buf = gkept
    result += (KeptProbs(gp_self, gm_self, gp_buf, gm_buf, n_blocks, bs, gm + jnp.log(gl),
                         tuple(gumbel_probs)),)
  return result[0] if len(result) == 1 else result


class KeptProbs(NamedTuple):
  """Attention probabilities of one call as its online softmax formed them (``return_probs``).

  The probability of query ``t`` for key ``j`` is ``p * exp(m - lse)`` with ``p, m`` from the
  part that holds ``j``: the call's own tokens (``self_p [B, K, G, T, T]``, ``self_m
  [B, K, G, T]``, causal and masked: 0 where not attended) or cache block ``i < n_blocks``
  (``blocks_p[i] [B, K, G, T, block]``, ``blocks_m[i]``; slots as ``cache_block(.., i, block)``
  reads them, so the last block may overlap an earlier one, with zeros there).
  """
  self_p: jax.Array
  self_m: jax.Array
  blocks_p: jax.Array   # [NB, B, K, G, T, block], NB = ceil(S / block); blocks >= n_blocks unset
  blocks_m: jax.Array   # [NB, B, K, G, T]
  n_blocks: jax.Array   # int32: blocks the loop read
  block: int
  lse: jax.Array        # [B, K, G, T]
  gumbel: tuple | None = None  # (tau, seed) for Keyformer's Gumbel-softmax; None: plain softmax


def cache_block(x, positions, lengths, layer, i, bs: int):
  """Block ``i`` (``bs`` slots) of layer ``layer`` of a stacked cache array ``x [L, B, K, S, ...]``.

  The last block may run past the capacity: it is read from ``S - bs`` and the slots an earlier
  block already covered are masked, so any capacity works. With ``positions [L, B, K, S]`` and
  ``lengths [B, K]`` also returns the block's positions and ``valid [B, K, bs]``.
  """
  s_cap = x.shape[3]
  nominal = i * bs
  start = jnp.minimum(nominal, s_cap - bs)
  # One dynamic_slice of the stacked array: only the block is read (indexing the layer first
  # would let XLA copy the whole layer's cache on every block).
  sl = lambda a: jax.lax.dynamic_slice(
      a, (layer, 0, 0, start) + (0,) * (a.ndim - 4), (1,) + a.shape[1:3] + (bs,) + a.shape[4:])[0]
  blk = sl(x)
  if positions is None:
    return blk
  pb = sl(positions)
  idx = start + jnp.arange(bs)
  valid = (idx >= nominal)[None, None, :] & (idx[None, None, :] < lengths[..., None])
  return blk, pb, valid


# Query rows per block of a prefill chunk's causal attention to itself on CPU (``_causal_self``).
SELF_ROWS = 128


def _causal_self(qg, k_new, v_new, q_positions, sliding_window, rows: int):
  """The chunk's tokens attending to themselves, causally: ``(m, l, acc)`` of the softmax of
  ``qg [B, K, G, T, H]`` over ``k_new, v_new [B, K, T, H]`` (``[B, K, G, T]`` twice and
  ``[B, K, G, T, H]``), by blocks of ``rows`` query rows, each against only the keys up to its
  last row. ``rows = T`` is one ``T x T`` block; smaller blocks skip the pairs above the
  diagonal: at T = 512 and 128 rows, 10/16 of the pairs are formed. Each row's result is the
  same either way (its softmax covers the same allowed keys). With the bias-free fold of full
  cache blocks (``_fold``), the default model's whole prefill on the 2-core CPU went from
  4.07 / 4.52 / 4.02 s to 3.97 / 3.71 / 3.92 s at 2k and 1.78 / 1.86 / 1.69 s to 1.64 / 1.69 /
  1.57 s at 1k (best of 5, three alternated old/new runs of a ``/tmp`` probe, 2026-11-28). GPU
  and TPU keep one block (untimed there)."""
  t = qg.shape[3]
  f32 = jnp.float32
  kf, vf = k_new.astype(f32), v_new.astype(f32)
  parts = []
  for r0 in range(0, t, rows):
    hi = r0 + rows  # keys [0, hi): the block's rows [r0, hi) see no later key
    s = jnp.einsum("BKGTH,BKSH->BKGTS", qg[:, :, :, r0:hi], kf[:, :, :hi])
    causal = jnp.arange(r0, hi)[:, None] >= jnp.arange(hi)[None, :]
    qpos = q_positions[:, None, None, r0:hi, None]
    mask = causal & _window_ok(qpos, q_positions[:, None, None, None, :hi], sliding_window)
    s = s + _mask_bias(mask)
    m = s.max(-1)
    p = jnp.exp(s - m[..., None])
    parts.append((m, p.sum(-1), jnp.einsum("BKGTS,BKSH->BKGTH", p, vf[:, :, :hi])))
  if len(parts) == 1:
    return parts[0]
  return tuple(jnp.concatenate(x, axis=3) for x in zip(*parts))


def _mask_bias(allowed):
  """0 where ``allowed``, ``_NEG`` elsewhere (float32, ``allowed``'s shape, which broadcasts).

  Adding it to scores instead of selecting (``where(allowed, s, _NEG)`` and again on the
  ``exp``) leaves one elementwise pass over the ``[B, K, G, T, block]`` scores fewer: masked
  scores become ``s + _NEG``, and ``exp(s + _NEG - m)`` is exactly 0 for any finite running max
  ``m`` of real scores. Measured on the 2-core CPU, one layer's chunk of 512 queries over 4096
  cached keys: 60-66 ms vs 73-82 ms with the selects (identical outputs)."""
  return jnp.where(allowed, jnp.float32(0.0), jnp.float32(_NEG))


def block_scores(qg: jax.Array, kb: jax.Array) -> jax.Array:
  """``qg [B, K, G, T, H] . kb [B, K, S, H]`` -> scores ``[B, K, G, T, S]``.

  For one new token (``T == 1``, a decode step) the keys are the dot's left operand, so the
  result comes out ``[B, K, S, G]`` and only that small array is transposed. Written the other
  way round, XLA CPU first copies every key block transposed to ``[B, K, H, S]`` for its dot:
  on the 2-core CPU, one decode step's attention over 30 layers with the default model's heads
  and 552 cached slots took 3.0-3.2 ms instead of 4.1-4.4 (best of 200, two alternated runs of
  a ``/tmp`` probe). Prefill chunks keep the einsum: there the scores are the large array; so
  do GPUs and TPUs (their decode timings were taken with it)."""
  b, k, g, t, h = qg.shape
  einsum = lambda: jnp.einsum("BKGTH,BKSH->BKGTS", qg, kb)
  if t != 1:
    return einsum()

  def keys_left():
    s = jax.lax.dot_general(kb, qg.reshape(b, k, g, h), (((3,), (3,)), ((0, 1), (0, 1))))
    return s.transpose(0, 1, 3, 2)[:, :, :, None, :]  # [B, K, S, G] -> [B, K, G, 1, S]

  return jax.lax.platform_dependent(cpu=keys_left, default=einsum)


def _fold(carry, qg, kb, vb, valid, return_p: bool = False, scores=None):
  """One online-softmax step: folds keys/values ``kb, vb [B, K, bs, H]`` (masked by ``valid``,
  broadcastable to ``[B, K, G, T, bs]``) into ``(m, l, acc)`` for queries ``qg [B, K, G, T, H]``.
  With ``return_p`` also returns the block's ``exp(s - m_new) [B, K, G, T, bs]`` (0 if masked).
  ``scores``: the block's ``qg . kb`` when the caller already formed it (``kb`` is then unused).
  The running max ``m`` must already be finite (``chunk_attention`` folds the always-allowed
  diagonal first): masked scores are then pushed to ``_NEG`` by an added bias and their
  ``exp`` underflows to exactly 0, with no second select over the block.

  On CPU a block every pair of which is allowed (every full cache block a prefill chunk reads)
  skips the bias: adding it costs XLA CPU two more passes over the ``[.., T, bs]`` scores (the
  biased scores are written for the max, then formed again for the exp). Adding zeros changes
  nothing, so the result is the same either way. The last prefill chunk of a 2k prompt, 30
  layers of attention on the 2-core CPU: 378-431 ms vs 483-538 ms (best of 15, three alternated
  runs of a ``/tmp`` probe). Elsewhere one path: a GPU would wait on the host for the branch.
  A decode step (``T == 1``) takes one path too: its one block spans the cache's free slots,
  so it is rarely all allowed, and the test and branch would run in every step of the loop."""
  if return_p or scores is not None or qg.shape[3] == 1:
    return _fold_masked(carry, qg, kb, vb, valid, return_p, scores)
  masked = lambda: _fold_masked(carry, qg, kb, vb, valid)
  on_cpu = lambda: jax.lax.cond(jnp.all(valid), lambda: _fold_masked(carry, qg, kb, vb, None),
                                masked)
  return jax.lax.platform_dependent(cpu=on_cpu, default=masked)


def _fold_masked(carry, qg, kb, vb, valid, return_p: bool = False, scores=None):
  """``_fold`` with the mask always added as a bias (``valid=None``: no mask)."""
  m, l, acc = carry
  sb = block_scores(qg, kb) if scores is None else scores
  if valid is not None:
    sb = sb + _mask_bias(valid)
  m_new = jnp.maximum(m, sb.max(-1))
  alpha = jnp.exp(m - m_new)
  p = jnp.exp(sb - m_new[..., None])
  out = (m_new, l * alpha + p.sum(-1),
         acc * alpha[..., None] + jnp.einsum("BKGTS,BKSH->BKGTH", p, vb))
  return (out, p) if return_p else out


def store_block_size(store, size: int) -> int:
  """Slots per read of a stored part (``KVCache.quant``) of about ``size``: whole groups that
  divide its capacity, so ``store.read(layer, i * bs, bs)`` never overlaps or runs past it."""
  g = store.group
  return g * math.gcd(max(size // g, 1), store.capacity // g)


def _quantized_blocks(quant, layer, qg, qpos, sliding_window, block_size, carry):
  """Folds the quantized part (``QuantStore``) into the running softmax, dequantizing one
  block of slots at a time (the packed codes are all that is stored)."""
  bs = store_block_size(quant, block_size)
  lengths = jax.lax.dynamic_index_in_dim(quant.lengths, layer, 0, keepdims=False)  # [B, K]
  n_blocks = (jnp.max(lengths) + bs - 1) // bs

  def body(i, carry):
    start = i * bs
    kb, vb, pb = quant.read(layer, start, bs)  # [B, K, bs, H] float32, [B, K, bs]
    valid = (start + jnp.arange(bs)[None, None, :] < lengths[..., None])[:, :, None, None, :]
    valid = valid & _window_ok(qpos, pb[:, :, None, None, :], sliding_window)
    return _fold(carry, qg, kb, vb, valid)

  return jax.lax.fori_loop(0, n_blocks, body, carry)


IMPLS = ("xla", "pallas", "interpret")


def _kernel_reads(quant, t: int, sliding_window, static_trip: bool) -> bool:
  """Whether a Pallas kernel can read this stored part in this call (see ``impl``): stores with
  ``kernel_attention`` (``PagedStore``, KIVI's ``QuantStore``), one query token, no window."""
  return (hasattr(quant, "kernel_attention") and t == 1 and sliding_window is None
          and not static_trip)


def _kernel_blocks(quant, layer, q, impl: str, carry):
  """Folds the stored part into the running softmax through its Pallas kernel: it returns the
  normalised output ``o`` and log normaliser ``lse`` over the store, which merge with
  ``(m, l, acc)`` exactly like one more block."""
  m, l, acc = carry  # [B, K, G, 1], ..., [B, K, G, 1, H]; q [B, K, G, H] unscaled
  o, lse = quant.kernel_attention(layer, q, interpret=impl == "interpret")
  lse = lse[..., None]  # [B, K, G, 1]
  m_new = jnp.maximum(m, lse)
  alpha, beta = jnp.exp(m - m_new), jnp.exp(lse - m_new)
  return m_new, l * alpha + beta, acc * alpha[..., None] + o[:, :, :, None] * beta[..., None]


def dense_attention_reference(q, k, v, q_positions, k_positions, k_valid, sliding_window=None):
  """Textbook softmax attention for tests: materialises the full score matrix.

  Args: ``q [B, T, N, H]``, ``k, v [B, K, S, H]``, ``q_positions [B, T]``,
  ``k_positions [B, K, S]``, ``k_valid [B, K, S]`` bool. Causality is by position.
  Returns ``[B, T, N, H]``.
  """
  b, t, n, h = q.shape
  kh = k.shape[1]
  qg = q.reshape(b, t, kh, n // kh, h).astype(jnp.float32) / math.sqrt(h)
  s = jnp.einsum("BTKGH,BKSH->BKGTS", qg, k.astype(jnp.float32))
  qp = q_positions[:, None, None, :, None]
  kp = k_positions[:, :, None, None, :]
  mask = k_valid[:, :, None, None, :] & (kp <= qp) & _window_ok(qp, kp, sliding_window)
  s = jnp.where(mask, s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  out = jnp.einsum("BKGTS,BKSH->BTKGH", p, v.astype(jnp.float32))
  return out.reshape(b, t, n, h)


class LayerInputs(NamedTuple):
  """What an observation hook sees of one layer's new tokens (inside the forward pass)."""

  q: jax.Array          # [B, T, N, H] post-RoPE queries
  k: jax.Array          # [B, K, T, H] post-RoPE keys (about to be appended)
  v: jax.Array          # [B, K, T, H] values
  q_pre: jax.Array      # [B, T, N, H] queries before RoPE
  k_pre: jax.Array      # [B, K, T, H] keys before RoPE
  positions: jax.Array  # [B, T] int32 original positions
  valid: jax.Array      # [B, T] bool, False for right padding
  inv_freq: jax.Array   # [H/2] RoPE inverse frequencies of this call
  lse: Any = None       # [B, K, G, T] each query's log softmax normaliser over cache + chunk
  probs: Any = None     # KeptProbs of this call's attention, when the hook asks (see below)
  sliding_window: Any = None  # the layer's window, for hooks that mask: a static int (Mistral)
  #   or, in a hybrid model (Gemma 3), a traced int32 scalar (global layers: beyond any distance)
  gumbel_probs: Any = None  # KeptProbs of softmax((s + G) / tau), when the hook asks (below)


# An observation hook: ``observe(layer, x: LayerInputs, cache) -> pytree``; ``cache`` is the
# read-only cache before this call's tokens are appended. A hook with the attribute
# ``wants_probs = True`` gets ``x.probs`` (``KeptProbs``) from the attention pass on a plain
# cache within ``models.decoder.PROBS_MAX_BYTES``; otherwise it is None and the hook recomputes.
# A hook with ``wants_gumbel_probs = (tau, seed)`` gets ``x.gumbel_probs`` the same way
# (Keyformer); a hook must check ``x.gumbel_probs.gumbel`` is its own (tau, seed). Outputs are
# stacked over layers by the model's scan (and over chunks by ``prefill``).
ObserveFn = Callable[[jax.Array, LayerInputs, Any], Any]
