"""Scores and statistics: RULER string match, distribution fidelity vs the full cache, CIs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def string_match_all(prediction: str, answers: list[str]) -> float:
  """RULER ``string_match_all``: fraction of reference answers found in the prediction
  (case-insensitive substring)."""
  p = prediction.lower()
  return float(np.mean([a.lower() in p for a in answers])) if answers else 0.0


def fidelity(logits: jax.Array, ref_logits: jax.Array, targets: jax.Array) -> dict:
  """Compares next-token distributions on the same teacher-forced continuation.

  Args:
    logits, ref_logits: ``[T, V]`` compressed-cache and full-cache logits.
    targets: ``[T]`` the continuation tokens (what follows each position).

  Returns:
    ``kl`` mean KL(full || compressed) in nats, ``top1`` agreement of argmaxes, and the
    continuation log-likelihoods ``ll`` (compressed) and ``ll_ref`` (full), summed.
  """
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  lq = jax.nn.log_softmax(ref_logits.astype(jnp.float32), -1)
  kl = jnp.sum(jnp.exp(lq) * (lq - lp), -1).mean()
  top1 = (lp.argmax(-1) == lq.argmax(-1)).mean()
  ll = jnp.take_along_axis(lp, targets[:, None], -1).sum()
  ll_ref = jnp.take_along_axis(lq, targets[:, None], -1).sum()
  return {"kl": float(kl), "top1": float(top1), "ll": float(ll), "ll_ref": float(ll_ref)}


def mean_ci(values, n_boot: int = 2000, seed: int = 0, outcomes: bool = False) -> dict:
  """Mean with a 95 % confidence interval and the sample count.

  With ``outcomes=True`` (task scores) and every value 0 or 1 (a needle found or not), the
  Wilson score interval, which stays honest at 0 % and 100 % (40/40 -> [91 %, 100 %], where a
  bootstrap would say [100 %, 100 %]); otherwise a percentile bootstrap.
  """
  x = np.asarray([v for v in values if v is not None], np.float64)
  if x.size == 0:
    return {"mean": None, "ci95": [None, None], "n": 0}
  if outcomes and np.isin(x, (0.0, 1.0)).all():
    n, p, z = x.size, x.mean(), 1.959964
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"mean": float(p), "ci95": [float(max(mid - half, 0.0)), float(min(mid + half, 1.0))],
            "n": int(n)}
  rng = np.random.default_rng(seed)
  boots = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
  lo, hi = np.percentile(boots, [2.5, 97.5])
  return {"mean": float(x.mean()), "ci95": [float(lo), float(hi)], "n": int(x.size)}


def mean_of_means(stats: list[dict], low: float | None = None,
                  high: float | None = None) -> dict:
  """The mean of per-stratum means (each a ``mean_ci`` result, e.g. one per haystack) with a
  95 % interval by combining standard errors: each stratum's SE is read off its own interval,
  ``(hi - lo) / (2 * 1.96)`` (Wilson for 0/1 scores, so a 0 % or 100 % stratum still counts its
  uncertainty), the average's SE is ``sqrt(sum SE_h^2) / H``, and the interval is
  ``mean +- 1.96 SE`` clipped to ``[low, high]``. The strata are fixed (these haystacks), not a
  sample of possible ones. ``n`` is the samples over all strata; None when a stratum is empty.
  """
  if not stats or any(s["mean"] is None for s in stats):
    return {"mean": None, "ci95": [None, None], "n": sum(s["n"] for s in stats)}
  z = 1.959964
  mean = float(np.mean([s["mean"] for s in stats]))
  se = float(np.sqrt(sum(((s["ci95"][1] - s["ci95"][0]) / (2 * z)) ** 2 for s in stats))
             / len(stats))
  lo, hi = mean - z * se, mean + z * se
  lo = lo if low is None else max(lo, low)
  hi = hi if high is None else min(hi, high)
  return {"mean": mean, "ci95": [float(lo), float(hi)], "n": int(sum(s["n"] for s in stats))}
