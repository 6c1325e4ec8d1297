"""Greedy per-(layer, kv head) rank assignment for MatryoshkaKV under a mean-rank budget.

Letters: L layers, K kv heads, H head dim, G rank grid ``{s, 2s, ..., H}`` (``s = step``).

1. Sensitivity: for every (keys or values, layer, head, rank r in the grid below H), the model
   runs on the calibration windows with *only that* head's keys (or values) cut to rank r; its
   error is the mean KL of the next-token distributions against the unprojected model. (The
   reference scores the relative error of the last hidden state, and also runs one forward pass
   per candidate; we use the output distribution, the quantity MatryoshkaKV distils.)
2. Greedy: all heads start at rank H; repeatedly cut by one grid step the head whose next cut
   adds the least error (errors assumed additive across heads), until the mean rank is at most
   ``budget * H`` (the reference: start at 128, steps of 32, stop at the target ratio). With
   ``per_layer`` (the launcher's default) a layer's heads are cut together, so the bytes of the
   cache, which stores each layer at its largest head rank, follow the budget exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib.lowrank import matryoshka as mk


def sensitivities(lm, p: mk.Projections, windows: np.ndarray, step: int,
                  progress: bool = False) -> np.ndarray:
  """``err [2, L, K, G]``: mean KL vs the full model with one head cut to each grid rank
  (the last grid entry, rank H, is 0). ``lm``: a loaded model (``params``, ``apply_fn``,
  ``new_cache``)."""
  from kvlab.lib.progress import tqdm  # pylint: disable=g-import-not-at-top
  l, k, h = p.shape
  if h % step:
    raise ValueError(f"rank step {step} must divide the head dim {h}")
  grid = np.arange(step, h + 1, step)
  apply_fn = lm.apply_fn
  toks = jnp.asarray(windows, jnp.int32)
  b, t = toks.shape
  n = jnp.full((b,), t, jnp.int32)
  cache = lm.new_cache(b, t)
  u = jnp.stack([jnp.asarray(p.u_k), jnp.asarray(p.u_v)])
  means = (jnp.asarray(p.mean_k), jnp.asarray(p.mean_v))

  @jax.jit
  def teacher(params, toks, cache):
    return jax.nn.log_softmax(apply_fn(params, toks, cache, n)[0][:, :-1])

  @jax.jit
  def kl(params, toks, cache, ranks, ref):
    pk = mk.projector(u[0], mk.rank_mask(ranks[0], h))
    pv = mk.projector(u[1], mk.rank_mask(ranks[1], h))
    logits = apply_fn(params, toks, cache, n, project=(pk, means[0], pv, means[1]))[0]
    lp = jax.nn.log_softmax(logits[:, :-1])
    return jnp.mean(jnp.sum(jnp.exp(ref) * (ref - lp), -1))

  ref = teacher(lm.params, toks, cache)
  err = np.zeros((2, l, k, len(grid)))
  cells = [(s, i, j, g) for s in range(2) for i in range(l) for j in range(k)
           for g in range(len(grid) - 1)]
  for s, i, j, g in tqdm(cells, desc="rank sensitivity", disable=not progress):
    ranks = np.full((2, l, k), h, np.int32)
    ranks[s, i, j] = grid[g]
    err[s, i, j, g] = float(kl(lm.params, toks, cache, jnp.asarray(ranks), ref))
  return err


def greedy_ranks(err: np.ndarray, step: int, head_dim: int, budget: float,
                 per_layer: bool = False) -> np.ndarray:
  """``err [2, L, K, G]`` -> ranks ``[2, L, K]`` with mean ``<= budget * head_dim``.

  ``per_layer``: every head of a layer gets the same rank (cut together, their errors summed).
  The cache stores each layer at its largest head rank (``lib.lowrank.projected``), so per-layer
  ranks make the bytes follow the budget exactly; per-head ranks pad within a layer."""
  if not 0.0 < budget <= 1.0:
    raise ValueError(f"budget is the mean kept fraction of the head dim, in (0, 1], got {budget}")
  if per_layer:
    k = err.shape[2]
    ranks = greedy_ranks(err.sum(2, keepdims=True), step, head_dim, budget)
    return np.repeat(ranks, k, axis=2)
  grid = np.arange(step, head_dim + 1, step)
  idx = np.full(err.shape[:3], len(grid) - 1)  # every head at rank H
  target = budget * head_dim
  while grid[idx].mean() > target + 1e-9:
    cut = np.where(idx > 0, np.take_along_axis(err, np.maximum(idx - 1, 0)[..., None], -1)[..., 0]
                   - np.take_along_axis(err, idx[..., None], -1)[..., 0], np.inf)
    flat = int(np.argmin(cut))
    if not np.isfinite(cut.flat[flat]):
      break  # every head at the smallest grid rank
    idx[np.unravel_index(flat, idx.shape)] -= 1
  return grid[idx].astype(np.int32)
