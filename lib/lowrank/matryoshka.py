"""MatryoshkaKV projections (Lin et al. 2025, METHODS.md §4.2): per (layer, kv head) orthogonal
bases for keys and values, PCA-initialised, kept exactly orthogonal by a Cayley map, truncated
to any rank (nested: the first r columns are the rank-r projection).

Letters: L layers, K kv heads, H head dim, N calibration tokens.

* ``pca``: eigenvectors of the covariance of the post-RoPE keys / values per (layer, head), in
  descending eigenvalue order, and their means (the reference centres both).
* ``orthogonal(u0, x) = u0 @ cayley(x - x^T)``: the trained basis. Parametrising the *update*
  (``x = 0`` gives the PCA basis) is our choice: the reference parametrises U itself by Cayley,
  which needs ``det U = +1`` and no eigenvalue -1; the product form needs neither and spans the
  same rotations near the PCA start.
* ``Projections`` holds ``u_k, u_v [L, K, H, H]``, ``mean_k, mean_v [L, K, H]`` and optionally
  searched ranks; saved with orbax together with the model's fingerprint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib import fingerprint as fingerprints
from kvlab.lib import saved_arrays

FORMAT = "kvlab-matryoshka/1"


@dataclasses.dataclass
class Projections:
  """Per-head bases and means; ``ranks [2, L, K]`` (keys, values) when a search assigned them."""

  u_k: np.ndarray
  mean_k: np.ndarray
  u_v: np.ndarray
  mean_v: np.ndarray
  meta: dict
  ranks: np.ndarray | None = None

  @property
  def shape(self) -> tuple[int, int, int]:
    """``(L, K, H)``."""
    return self.u_k.shape[:3]

  def check_model(self, fingerprint: str, num_layers: int, kv_heads: int, head_dim: int,
                  what: str = "the model") -> None:
    """Clear error when these projections were made for another model."""
    if self.shape != (num_layers, kv_heads, head_dim):
      raise ValueError(f"MatryoshkaKV projections have shape (layers, kv heads, head dim) = "
                       f"{self.shape}, {what} has {(num_layers, kv_heads, head_dim)}: train "
                       "projections for it with python -m experiments.train_matryoshka")
    got = self.meta.get("model_fingerprint")
    if got and got != fingerprint:
      made_for = fingerprints.describe(self.meta)
      fix = "train projections for it with python -m experiments.train_matryoshka --model=..."
      fingerprints.check_format(got, artifact="these MatryoshkaKV projections",
                                made_for=made_for, what=what, fix=fix)
      raise ValueError(f"these MatryoshkaKV projections were made for model {made_for} "
                       f"(fingerprint {got}), not {what} (fingerprint {fingerprint}): {fix}")


def cayley(x: jax.Array) -> jax.Array:
  """``[..., H, H]`` -> the orthogonal ``(I - A/2)^-1 (I + A/2)`` with ``A = x - x^T``."""
  a = x - jnp.swapaxes(x, -1, -2)
  eye = jnp.eye(x.shape[-1], dtype=x.dtype)
  return solve_positive_real(eye - 0.5 * a, eye + 0.5 * a)


def solve_positive_real(m: jax.Array, b: jax.Array) -> jax.Array:
  """``m^-1 b`` for ``m [..., n, n]`` whose symmetric part is positive definite (``I - A/2``
  with A skew: ``x^T m x = |x|^2``), ``b [..., n, k]``: Gauss-Jordan without pivoting (stable
  for such m), in plain jnp ops.

  Not ``jnp.linalg.solve``: on CPU its LAPACK call, inside the same XLA program as the
  decoder's forward pass, never returned (jax 0.10.2; it runs fine on its own)."""
  n = m.shape[-1]
  aug = jnp.concatenate([m, b], axis=-1)  # [..., n, n + k]

  def step(i, aug):
    row = jax.lax.dynamic_index_in_dim(aug, i, axis=-2, keepdims=False)  # [..., n + k]
    row = row / jax.lax.dynamic_index_in_dim(row, i, axis=-1, keepdims=True)
    col = jax.lax.dynamic_index_in_dim(aug, i, axis=-1, keepdims=False)  # [..., n]
    is_i = (jnp.arange(n) == i)[:, None]
    return jnp.where(is_i, row[..., None, :], aug - col[..., :, None] * row[..., None, :])

  return jax.lax.fori_loop(0, n, step, aug)[..., n:]


def orthogonal(u0: jax.Array, x: jax.Array) -> jax.Array:
  """The trained bases ``u0 @ cayley(x)``, ``[..., H, H]`` (exactly orthogonal for any x)."""
  return jnp.einsum("...ij,...jk->...ik", u0, cayley(x))


def rank_mask(ranks: jax.Array, head_dim: int) -> jax.Array:
  """``ranks [...]`` -> ``[..., H]`` float mask of the first ``rank`` columns."""
  return (jnp.arange(head_dim) < jnp.asarray(ranks)[..., None]).astype(jnp.float32)


def projector(u: jax.Array, mask: jax.Array) -> jax.Array:
  """``u [..., H, H]``, ``mask [..., H]`` -> ``U diag(mask) U^T [..., H, H]``."""
  return jnp.einsum("...ir,...r,...jr->...ij", u, mask, u)


def as_ranks(rank: float, head_dim: int) -> int:
  """A fraction of the head dim (<= 1) or an absolute rank (> 1) -> an int in [1, H]."""
  r = int(round(rank * head_dim)) if rank <= 1 else int(rank)
  if not 1 <= r <= head_dim:
    raise ValueError(f"rank {rank} gives {r} of head dim {head_dim}: give a fraction in (0, 1] "
                     f"or an integer in [1, {head_dim}]")
  return r


# ---- PCA from calibration text ----------------------------------------------------------------

def _observe_moments(layer, x, cache):
  """Observation hook: one layer's key and value sums and outer products per kv head."""
  del layer, cache
  ok = x.valid[:, None, :, None].astype(jnp.float32)  # [B, 1, T, 1]
  k, v = x.k.astype(jnp.float32) * ok, x.v.astype(jnp.float32) * ok
  return (k.sum((0, 2)), jnp.einsum("BKTi,BKTj->Kij", k, k),
          v.sum((0, 2)), jnp.einsum("BKTi,BKTj->Kij", v, v))


def kv_moments(lm, samples: Sequence[Sequence[int]], progress: bool = False) -> dict:
  """Sums over ``samples`` (token lists) of the post-RoPE keys and values per (layer, kv head):
  ``{"n": N, "sum_k": [L, K, H], "outer_k": [L, K, H, H], "sum_v", "outer_v"}`` (float64).

  ``lm``: a loaded model; its ``params``, ``apply_fn`` and ``new_cache`` run the forward."""
  from kvlab.lib.progress import tqdm  # pylint: disable=g-import-not-at-top
  apply_fn = lm.apply_fn

  @jax.jit
  def one(params, toks, cache):
    _, _, obs = apply_fn(params, toks, cache, jnp.array([toks.shape[1]]), None, _observe_moments)
    return obs

  acc = None
  n = 0
  for s in tqdm(samples, desc="kv moments", disable=not progress):
    toks = jnp.asarray(s, jnp.int32)[None]
    got = [np.asarray(a, np.float64) for a in one(lm.params, toks, lm.new_cache(1, len(s)))]
    acc = got if acc is None else [a + b for a, b in zip(acc, got)]
    n += len(s)
  return {"n": n, "sum_k": acc[0], "outer_k": acc[1], "sum_v": acc[2], "outer_v": acc[3]}


def pca(moments: dict, model: str = "", fingerprint: str = "", source: str = "") -> Projections:
  """Bases from ``kv_moments``: eigenvectors of each head's covariance, largest first; the
  meta records the model's name, ``source`` path and fingerprint."""
  n = moments["n"]

  def basis(s, o):
    mean = s / n
    cov = o / n - np.einsum("...i,...j->...ij", mean, mean)
    _, vecs = np.linalg.eigh(cov)  # ascending
    u = vecs[..., ::-1]
    # det +1 (the reference needs it for its Cayley inverse; harmless here): flip the last column
    flip = np.linalg.det(u) < 0
    u[..., -1] = np.where(flip[..., None], -u[..., -1], u[..., -1])
    return u.astype(np.float32), mean.astype(np.float32)

  u_k, m_k = basis(moments["sum_k"], moments["outer_k"])
  u_v, m_v = basis(moments["sum_v"], moments["outer_v"])
  meta = {"format": FORMAT, "kind": "pca", "model": model, "source": source,
          "model_fingerprint": fingerprint,
          "calibration_tokens": int(n)}
  return Projections(u_k, m_k, u_v, m_v, meta)


# ---- storage (orbax) ----------------------------------------------------------------------------

def save(p: Projections, path: str) -> str:
  """Writes ``p`` as an orbax checkpoint directory (arrays + JSON metadata); returns it."""
  arrays: dict[str, Any] = {"u_k": p.u_k, "mean_k": p.mean_k, "u_v": p.u_v, "mean_v": p.mean_v}
  if p.ranks is not None:
    arrays["ranks"] = np.asarray(p.ranks, np.int32)
  return saved_arrays.save(path, arrays, p.meta)


def load(path: str) -> Projections:
  """Reads projections written by ``save``; clear errors for a missing or foreign directory."""
  a, meta = saved_arrays.load(path, FORMAT, "MatryoshkaKV projections",
                              "python -m experiments.train_matryoshka")
  return Projections(a["u_k"], a["mean_k"], a["u_v"], a["mean_v"], meta, a.get("ranks"))
