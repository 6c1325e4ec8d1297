"""KVQuant's non-uniform datatype and dense-and-sparse outliers (METHODS.md §3.1, parts 3–5).

* ``kmeans_1d``: Fisher-weighted 1-D k-means giving a lookup table (LUT) of ``2**bits``
  centroids in [-1, 1] (one per layer and per K/V; ``lib.quant.kvquant_calibrate``).
* ``qnorm``: Q-Norm, the affine correction of a LUT so the quantized calibration distribution
  has the original mean and standard deviation (``normscale = s1/s2``,
  ``normoffset = m1 - m2 * s1/s2``); applied to the centroids once, which is the same as
  applying it to every dequantized value.
* ``encode`` / ``decode``: nearest-centroid codes of values normalised to [-1, 1].
* ``top_outliers`` / ``split_outliers`` / ``overlay``: a fixed-capacity sparse overlay: per
  vector, the ``n`` entries farthest from the centre are kept in float16 with their index and
  excluded from the dense range and codes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kmeans_1d(x: jax.Array, weights: jax.Array, k: int, iters: int = 50) -> jax.Array:
  """Weighted Lloyd k-means of the samples ``x [n]`` (weights ``[n]``, >= 0) into ``k``
  centroids. Starts at weighted quantiles (deterministic); a centroid left with no weight keeps
  its place. Returns ``[k]`` float32 sorted ascending. Minimises ``sum w * (x - c(x))**2``,
  which with squared gradients as weights is KVQuant's sensitivity-weighted objective."""
  x = x.astype(jnp.float32).reshape(-1)
  w = weights.astype(jnp.float32).reshape(-1)
  w = w + 1e-12 * jnp.max(w)  # no sample is weightless (all-zero gradients fall back to uniform)
  order = jnp.argsort(x)
  xs, ws = x[order], w[order]
  cw = jnp.cumsum(ws) / jnp.sum(ws)
  c0 = xs[jnp.clip(jnp.searchsorted(cw, (jnp.arange(k) + 0.5) / k), 0, x.shape[0] - 1)]

  def step(c, _):
    c = jnp.sort(c)
    code = encode(xs, c)
    sw = jax.ops.segment_sum(ws, code, k)
    swx = jax.ops.segment_sum(ws * xs, code, k)
    return jnp.where(sw > 0, swx / jnp.where(sw > 0, sw, 1.0), c), None

  c, _ = jax.lax.scan(step, c0, None, length=iters)
  return jnp.sort(c)


def qnorm(lut: jax.Array, x: jax.Array) -> jax.Array:
  """Q-Norm: ``lut [k]`` rescaled so that quantizing the samples ``x`` keeps their mean and
  standard deviation. Returns the corrected ``[k]`` LUT."""
  x = x.astype(jnp.float32).reshape(-1)
  y = lut[encode(x, lut)]
  m1, s1 = x.mean(), x.std()
  m2, s2 = y.mean(), y.std()
  scale = jnp.where(s2 > 0, s1 / jnp.where(s2 > 0, s2, 1.0), 1.0)
  return lut * scale + (m1 - m2 * scale)


def encode(u: jax.Array, lut: jax.Array) -> jax.Array:
  """Nearest-centroid codes (``uint8``, same shape as ``u``) for a sorted ``lut [k]``."""
  mids = (lut[1:] + lut[:-1]) * 0.5
  return jnp.searchsorted(mids, u.astype(jnp.float32)).astype(jnp.uint8)


def decode(codes: jax.Array, lut: jax.Array) -> jax.Array:
  """``lut[codes]`` in float32."""
  return jnp.take(lut.astype(jnp.float32), codes.astype(jnp.int32), axis=0)


def top_outliers(score: jax.Array, n: int):
  """The ``n`` entries of largest ``score [..., H]`` per vector: ``(idx [..., n] uint8,
  hit [..., H] bool)``. ``n = 0`` selects nothing."""
  if n == 0:
    return jnp.zeros(score.shape[:-1] + (0,), jnp.uint8), jnp.zeros(score.shape, bool)
  _, idx = jax.lax.top_k(score, n)
  hit = jnp.any(jnp.arange(score.shape[-1]) == idx[..., None], axis=-2)
  return idx.astype(jnp.uint8), hit


def split_outliers(u: jax.Array, n: int):
  """Static-range split (keys): ``u [..., H]`` normalised so the dense range is [-1, 1]; the
  ``n`` entries of largest ``|u|`` per vector become the sparse part. Returns ``(idx [..., n]
  uint8, dense [..., H])``, ``dense`` with those entries at 0 (the range's centre) and the
  rest clipped to [-1, 1]."""
  idx, hit = top_outliers(jnp.abs(u), n)
  return idx, jnp.clip(jnp.where(hit, 0.0, u), -1.0, 1.0)


def overlay(dense: jax.Array, idx: jax.Array, values: jax.Array) -> jax.Array:
  """Writes the sparse ``values [..., n]`` at ``idx [..., n]`` into ``dense [..., H]``."""
  if idx.shape[-1] == 0:
    return dense
  hit = jnp.arange(dense.shape[-1]) == idx[..., None].astype(jnp.int32)  # [..., n, H]
  put = jnp.sum(jnp.where(hit, values[..., None].astype(dense.dtype), 0), axis=-2)
  return jnp.where(hit.any(-2), put, dense)


def outlier_count(head_dim: int, fraction: float) -> int:
  """Sparse entries per vector for a target ``fraction`` of values kept exactly (>= 1 when
  ``fraction > 0``): 1 % of head dim 64 or 128 rounds up to 1 or 2."""
  if not 0.0 <= fraction < 0.5:
    raise ValueError(f"outlier fraction must be in [0, 0.5), got {fraction} (KVQuant keeps "
                     "1 %: 0.01)")
  return 0 if fraction == 0 else max(1, int(round(fraction * head_dim + 0.499)))
