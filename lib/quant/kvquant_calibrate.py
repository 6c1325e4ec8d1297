"""KVQuant's offline calibration (METHODS.md §3.1): Fisher information, per-channel key ranges,
per-layer non-uniform datatypes (Fisher-weighted k-means) and Q-Norm; saved with orbax.

Letters: L layers, K kv heads, H head dim, T calibration tokens per sample, C centroids.

Choices (where METHODS.md or the reference leave room):
* Fisher information of an activation = its squared gradient of the mean next-token NLL of the
  calibration sample, computed with ``jax.grad`` through a zero ``probe`` added to every layer's
  pre-RoPE keys and values (``models.decoder``); the squared gradients of all samples weight
  their own activations (one k-means point each), as KVQuant weights sklearn's k-means.
* key ranges are static per (layer, kv head, channel): the 0.5 % and 99.5 % quantiles of the
  pre-RoPE calibration keys (``outlier_fraction = 0.01``, the reference's
  ``sparsity_threshold = 0.99``); value ranges are per token at run time (the same split as
  ``KVQuantStore``: the ``n`` entries farthest from the token's median set aside).
* k-means runs on the normalised inliers (|u| <= 1) of each layer, at most ``max_points``
  points drawn uniformly without replacement (the reference clusters every activation; 2**20
  points bound the time), ``iters = 50`` Lloyd steps (sklearn's ``max_iter=50``), started at
  weighted quantiles instead of k-means++ (deterministic).
* Q-Norm is applied to the LUTs of the bit widths in ``qnorm_bits`` (default: 2 bit, as the
  reference's ``--norm`` is used for 2 bit).
* RoPE frequencies are the model's at the calibration length (static for every rope type but
  dynamic NTK, where kvquant's un-rotation is then approximate beyond that length).
* One calibration holds the LUTs of every requested width (2, 3, 4 bit by default) and the
  model's fingerprint; loading it for another model raises.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib import fingerprint as fingerprints
from kvlab.lib import saved_arrays
from kvlab.lib.fingerprint import model_fingerprint  # re-exported: callers import it from here
from kvlab.lib.quant import nuq

FORMAT = "kvlab-kvquant-calibration/1"


@dataclasses.dataclass
class Calibration:
  """What KVQuant needs at run time. Arrays are numpy.

  k_offset, k_range: ``[L, K, H]`` centre and half-width of the pre-RoPE keys per channel.
  inv_freq: ``[H/2]`` the model's RoPE inverse frequencies (to un-rotate and rotate keys).
  luts: ``{"k2": [L, 4], "v2": [L, 4], "k3": [L, 8], ...}`` sorted centroids in [-1, 1].
  meta: model fingerprint and how the calibration was made (JSON-able).
  """

  k_offset: np.ndarray
  k_range: np.ndarray
  inv_freq: np.ndarray
  luts: dict[str, np.ndarray]
  meta: dict[str, Any]

  def lut(self, kind: str, bits: int) -> np.ndarray:
    key = f"{kind}{bits}"
    if key not in self.luts:
      have = sorted({int(k[1:]) for k in self.luts})
      raise ValueError(f"this calibration has no {bits}-bit datatype (it has {have} bit): "
                       f"re-run experiments/calibrate_kvquant.py with --bits including {bits}")
    return self.luts[key]

  def check_model(self, fingerprint: str, what: str = "the model") -> None:
    """Raises unless the calibration was made on the model with this fingerprint (an old-format
    fingerprint is refused: re-calibrate)."""
    stored = self.meta.get("fingerprint")
    if stored == fingerprint:
      return
    made_for = fingerprints.describe(self.meta)
    fix = "calibrate this model with python -m experiments.calibrate_kvquant --model=..."
    fingerprints.check_format(stored, artifact="this KVQuant calibration", made_for=made_for,
                              what=what, fix=fix)
    raise ValueError(f"KVQuant calibration was made on {made_for} (fingerprint {stored}), not on "
                     f"{what} (fingerprint {fingerprint}): {fix}")

  def check_shapes(self, num_layers: int, kv_heads: int, head_dim: int) -> None:
    want = (num_layers, kv_heads, head_dim)
    if tuple(self.k_offset.shape) != want:
      raise ValueError(f"KVQuant calibration is for [layers, kv heads, head dim] = "
                       f"{list(self.k_offset.shape)} ({self.meta.get('model', '?')}), the cache "
                       f"has {list(want)}: calibrate this model with "
                       "experiments/calibrate_kvquant.py")


# ---- Fisher information ---------------------------------------------------------------------

def kv_and_fisher(lm, tokens: Sequence[int]):
  """Pre-RoPE keys, values and their squared gradients for one calibration sample.

  ``lm``: a loaded model; its ``apply_fn`` (with the ``probe`` argument of
  ``models.decoder.make_apply_fn``), ``params`` and ``new_cache`` run the forward.

  Returns four float32 arrays ``[L, T, K, H]``: keys, values, Fisher of keys, Fisher of
  values (the gradient of the sample's mean next-token NLL, squared).
  """
  c = lm.config
  toks = jnp.asarray(tokens, jnp.int32)[None]
  key = (lm.apply_fn, c.num_layers, c.num_kv_heads, c.head_dim)
  if key not in _FNS:
    _FNS[key] = _fisher_fn(lm.apply_fn, c.num_layers, c.num_kv_heads, c.head_dim)
  cache = lm.new_cache(1, len(tokens))
  return _FNS[key](lm.params, toks, cache)


_FNS: dict = {}


def _observe_pre_rope(layer, x, cache):
  """Observation hook: the pre-RoPE keys and the values (after the probe: the same values)."""
  del layer, cache
  return x.k_pre, x.v


def _fisher_fn(apply_fn, num_layers: int, kv_heads: int, head_dim: int):
  """The jitted ``(params, tokens [1, T], cache) -> (k, v, fisher_k, fisher_v)``."""

  @jax.jit
  def fn(params, toks, cache):
    t = toks.shape[1]
    zeros = jnp.zeros((num_layers, 1, t, kv_heads, head_dim), jnp.float32)

    def loss(probe):
      logits, _, obs = apply_fn(params, toks, cache, jnp.array([t]), None, _observe_pre_rope,
                                probe=probe)
      lp = jax.nn.log_softmax(logits[0, :-1])
      nll = -jnp.take_along_axis(lp, toks[0, 1:, None], axis=1).mean()
      return nll, obs

    (gk, gv), (k_pre, v) = jax.grad(loss, has_aux=True)((zeros, zeros))
    # obs: [L, B, K, T, H]; probe grads: [L, B, T, K, H] -> everything [L, T, K, H]
    to_ltkh = lambda a: a[:, 0].transpose(0, 2, 1, 3)
    return to_ltkh(k_pre), to_ltkh(v), jnp.square(gk[:, 0]), jnp.square(gv[:, 0])

  return fn


# ---- datatypes -------------------------------------------------------------------------------

def key_ranges(keys: np.ndarray, outlier_fraction: float = 0.01):
  """Per-channel static ranges from calibration keys ``[L, N, K, H]`` (N tokens of all
  samples): ``(offset, range) [L, K, H]`` from the ``outlier_fraction / 2`` and
  ``1 - outlier_fraction / 2`` quantiles."""
  lo = np.quantile(keys, outlier_fraction / 2, axis=1)
  hi = np.quantile(keys, 1 - outlier_fraction / 2, axis=1)
  return ((hi + lo) / 2).astype(np.float32), np.maximum((hi - lo) / 2, 1e-6).astype(np.float32)


def normalised_values(values: np.ndarray, n_out: int):
  """Per-token normalisation of values ``[..., H]`` exactly as ``KVQuantStore`` does it:
  ``(u, inlier mask)``, ``u`` in [-1, 1] on inliers."""
  v = jnp.asarray(values, jnp.float32)
  med = jnp.median(v, axis=-1, keepdims=True)
  _, hit = nuq.top_outliers(jnp.abs(v - med), n_out)
  rest = jnp.where(hit, med, v)
  lo, hi = rest.min(-1, keepdims=True), rest.max(-1, keepdims=True)
  u = (v - (hi + lo) / 2) / jnp.maximum((hi - lo) / 2, 1e-6)
  return np.asarray(u), ~np.asarray(hit)


def fit_lut(u: np.ndarray, fisher: np.ndarray, inlier: np.ndarray, bits: int, *,
            qnorm: bool, iters: int = 50, max_points: int = 1 << 20, seed: int = 0) -> np.ndarray:
  """One layer's LUT: Fisher-weighted k-means (``2**bits`` centroids) of the inlier normalised
  activations ``u`` (weights ``fisher``), then Q-Norm if asked. Returns ``[2**bits]``."""
  x = u[inlier].astype(np.float32)
  w = fisher[inlier].astype(np.float32)
  x = np.clip(x, -1.0, 1.0)
  if x.size > max_points:
    pick = np.random.default_rng(seed).choice(x.size, max_points, replace=False)
    x, w = x[pick], w[pick]
  lut = nuq.kmeans_1d(jnp.asarray(x), jnp.asarray(w), 1 << bits, iters)
  if qnorm:
    lut = nuq.qnorm(lut, jnp.asarray(x))
  return np.asarray(lut, np.float32)


def calibrate(lm, samples: Sequence[Sequence[int]], *, bits: Sequence[int] = (2, 3, 4),
              qnorm_bits: Sequence[int] = (2,), outlier_fraction: float = 0.01,
              iters: int = 50, max_points: int = 1 << 20, model_name: str = "",
              progress: bool = True) -> Calibration:
  """Runs the whole calibration on token ``samples`` (each a list of ids). Returns a
  ``Calibration`` with LUTs for every width in ``bits``; its meta names the model
  (``model_name``, ``lm.source``) and holds its fingerprint."""
  from kvlab.lib.progress import tqdm  # pylint: disable=g-import-not-at-top
  c = lm.config
  n_out = nuq.outlier_count(c.head_dim, outlier_fraction)
  ks, vs, fks, fvs = [], [], [], []
  for s in tqdm(samples, desc="fisher", disable=not progress):
    k, v, fk, fv = (np.asarray(a) for a in kv_and_fisher(lm, list(s)))
    ks.append(k), vs.append(v), fks.append(fk), fvs.append(fv)
  keys, vals = np.concatenate(ks, 1), np.concatenate(vs, 1)  # [L, N, K, H]
  fk, fv = np.concatenate(fks, 1), np.concatenate(fvs, 1)
  del ks, vs, fks, fvs
  k_off, k_rng = key_ranges(keys, outlier_fraction)
  luts: dict[str, np.ndarray] = {}
  steps = [(kind, b, layer) for b in bits for kind in ("k", "v") for layer in range(c.num_layers)]
  per: dict[tuple, np.ndarray] = {}
  for kind, b, layer in tqdm(steps, desc="k-means", disable=not progress):
    if kind == "k":
      u = (keys[layer] - k_off[layer][None]) / k_rng[layer][None]
      inl, f = np.abs(u) <= 1.0, fk[layer]
    else:
      u, inl = normalised_values(vals[layer], n_out)
      f = fv[layer]
    per[kind, b, layer] = fit_lut(u, f, inl, b, qnorm=b in qnorm_bits, iters=iters,
                                  max_points=max_points, seed=layer)
  for b in bits:
    for kind in ("k", "v"):
      luts[f"{kind}{b}"] = np.stack([per[kind, b, l] for l in range(c.num_layers)])
  from kvlab.lib.rope import inv_freq_for  # pylint: disable=g-import-not-at-top
  inv_freq = np.asarray(inv_freq_for(c.rope, max(len(s) for s in samples)), np.float32)
  meta = {"format": FORMAT, "model": model_name, "source": getattr(lm, "source", ""),
          "fingerprint": model_fingerprint(c, lm.params),
          "num_layers": c.num_layers, "kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
          "bits": list(bits), "qnorm_bits": list(qnorm_bits),
          "outlier_fraction": outlier_fraction, "n_samples": len(samples),
          "seqlen": int(max(len(s) for s in samples)), "kmeans_iters": iters,
          "max_points": max_points}
  return Calibration(k_off, k_rng, inv_freq, luts, meta)


# ---- storage (orbax) ---------------------------------------------------------------------------

def save(cal: Calibration, path: str) -> str:
  """Writes ``cal`` as an orbax checkpoint directory (arrays + JSON metadata); returns it."""
  arrays = {"k_offset": cal.k_offset, "k_range": cal.k_range, "inv_freq": cal.inv_freq,
            "luts": dict(cal.luts)}
  return saved_arrays.save(path, arrays, cal.meta)


def load(path: str) -> Calibration:
  """Reads a calibration written by ``save``; clear errors for a missing or foreign directory."""
  arr, meta = saved_arrays.load(path, FORMAT, "KVQuant calibration",
                                "python -m experiments.calibrate_kvquant --out=" +
                                os.path.abspath(path))
  return Calibration(arr["k_offset"], arr["k_range"], arr["inv_freq"], dict(arr["luts"]), meta)
