"""KVzip's context-independent variant (Kim et al. 2025, arXiv 2505.23416): whole heads keep
the context or drop it, chosen once per model from KVzip's repeat scores, so compressing costs
nothing at run time.

Offline, ``experiments/calibrate_kvzip_heads.py`` runs KVzip's repeats (``lib.protocol.
reconstruction_scores``) on real text (the stdlib docs, not an evaluation task) and gives each
(layer, kv head) one score: the largest repeat score it gives any context slot, averaged over
the calibration samples. At run time the heads are ranked by that table across all layers; the
best keep their whole context, the others only the first ``sinks`` slots (and the template's
prefix, when the protocol names it) and the ``window`` most recent, and one head at the
boundary takes what budget is left as a longer window. The total is the uniform budget's
(``ratio`` of every head's context), so bytes are comparable with every other method.

Choices (the paper's head-level mode is DuoAttention-style; what follows is ours where the
paper or its code did not say, or was not read):
  * head score = max over context slots of the pair scores [recall: the paper pools the
    pair-level scores along the sequence; max chosen here], mean over samples; the first
    ``sinks`` slots and the template's prefix are left out of the max (every head attends to
    its sinks, which would rank nothing).
  * heads dropping the context keep ``sinks`` + ``window`` slots (DuoAttention's streaming
    heads), not nothing (the KVzip code's head mode keeps only the system prompt).
  * budgets differ per head, so the cache is ragged: paged by default (``Ragged``), bytes from
    the leaves.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax.numpy as jnp
import numpy as np

from kvlab.lib.cache import KVCache
from kvlab.lib.methods.base import Method, forced, smallest_budget
from kvlab.lib.methods.budgets import Ragged

DEFAULT_TABLE = os.path.normpath(os.path.join(
    os.path.dirname(__file__), "..", "..", "results", "kvzip_heads", "smollm2-135m.json"))
CALIBRATE = "python -m experiments.calibrate_kvzip_heads --model=<model> --out=<table.json>"


def table_from_scores(scores: np.ndarray, length: int, skip: int) -> np.ndarray:
  """``scores [L, 1, K, S]`` repeat scores -> ``[L, K]``: each head's largest over the context
  slots ``skip .. length - 1``."""
  if not 0 <= skip < length:
    raise ValueError(f"nothing to score: {skip} leading slots skipped of {length}")
  return scores[:, 0, :, skip:length].max(-1)


def load_table(path: str) -> dict:
  """The calibration file: ``{"scores": [L][K], "fingerprint": str, "model": str, ...}``
  (read again when the file changes)."""
  if not os.path.exists(path):
    raise ValueError(f"kvzip_heads: no head table at {path}: make one with {CALIBRATE} and pass "
                     "--method=kvzip_heads:table=<table.json>")
  st = os.stat(path)
  return _read(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int, size: int) -> dict:
  del mtime_ns, size  # the cache's key: a rewritten file is read again
  try:
    with open(path) as f:
      t = json.load(f)
    np.asarray(t["scores"], np.float32).reshape(len(t["scores"]), -1)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"kvzip_heads: {path} is not a head table ({e}): remake it with "
                     f"{CALIBRATE}") from e
  return t


@dataclasses.dataclass(frozen=True)
class KVzipHeads(Ragged, Method):
  """Whole heads keep their context (the best by a calibrated ``table`` of KVzip head scores,
  ``[L, K]``), the others ``sinks`` + ``window`` slots; see the module docstring."""

  table: str = DEFAULT_TABLE
  sinks: int = 4
  window: int = 32
  name = "kvzip_heads"

  def __post_init__(self):
    super().__post_init__()
    if self.sinks < 0 or self.window < 0:
      raise ValueError(f"kvzip_heads: sinks and window are slot counts >= 0, got "
                       f"{self.sinks} and {self.window}: e.g. "
                       "--method=kvzip_heads:sinks=4:window=32")

  def budget_notes(self, lengths, kept):
    uniform = Method.kept(self, lengths)
    b, n = smallest_budget(lengths, uniform)
    base = self.sinks + self.window
    if base <= b or b >= n:
      return []
    return [f"kvzip_heads: sinks + window ({base} tokens) exceed the uniform budget ({b} of a "
            f"{n}-token prompt): every head keeps at least {min(base, n)}, so the cache keeps "
            f"more than the ratio says: lower them (--method=kvzip_heads:sinks=4:window="
            f"{max(b - 4, 0)}) or raise the ratio"]

  def head_table(self, num_layers: int, kv_heads: int) -> np.ndarray:
    """``[L, K]`` float32 head scores, checked against the cache's shape."""
    t = np.asarray(load_table(self.table)["scores"], np.float32)
    if t.shape != (num_layers, kv_heads):
      raise ValueError(f"kvzip_heads: the table {self.table} has {t.shape} (layers, kv heads) "
                       f"but the cache has {(num_layers, kv_heads)}: it was made for another "
                       f"model; make one for this model with {CALIBRATE}")
    return t

  def check_for(self, config, params, what: str = "the model") -> None:
    """Raises a clear error when the table was calibrated on another model."""
    from kvlab.lib.quant.kvquant_calibrate import model_fingerprint  # pylint: disable=g-import-not-at-top
    self.head_table(config.num_layers, config.num_kv_heads)
    from kvlab.lib import fingerprint  # pylint: disable=g-import-not-at-top
    table = load_table(self.table)
    want, have = table.get("fingerprint"), model_fingerprint(config, params)
    if want is not None and want != have:
      made_for = fingerprint.describe(table)
      fingerprint.check_format(want, artifact=f"kvzip_heads: the table {self.table}",
                               made_for=made_for, what=what, fix=CALIBRATE)
      raise ValueError(f"kvzip_heads: the table {self.table} was calibrated on another model "
                       f"({made_for}, fingerprint {want}) than {what} (fingerprint {have}): "
                       f"make one with {CALIBRATE}")

  def scores(self, cache: KVCache, obs=None):
    """``[L, B, K, S]``: sinks (and the template prefix, ``obs["prefix"]`` where given) forced,
    then the most recent first; a head's budget decides how far back it reaches."""
    n_sink = jnp.asarray(self.sinks)
    if isinstance(obs, dict) and "prefix" in obs:
      n_sink = jnp.maximum(n_sink, obs["prefix"])[None, :, None, None]
    keep = (cache.positions < n_sink) & (cache.positions >= 0)
    return jnp.where(keep, forced(cache.positions), cache.positions.astype(jnp.float32))

  def kept(self, lengths: np.ndarray) -> np.ndarray:
    """``lengths [L, B, K]`` -> budgets ``[L, B, K]``: the context for the best heads,
    ``sinks + window`` for the others, one boundary head in between; per row they sum to the
    uniform budgets' total (``ratio`` or ``budget`` of every head). They depend on the lengths
    and the table only, so compressing while prefilling (``lib.online``) uses them as they are."""
    uniform = super().kept(lengths)
    n_l, n_b, n_k = lengths.shape
    order = np.argsort(-self.head_table(n_l, n_k).reshape(-1), kind="stable")  # best first
    base = np.minimum(self.sinks + self.window, lengths)
    spare = np.maximum(uniform - base, 0).sum((0, 2))  # [B]: budget beyond the base
    room = np.moveaxis(lengths - base, 1, 0).reshape(n_b, -1)[:, order]  # [B, L*K] rank order
    before = np.cumsum(room, axis=1) - room
    extra_ranked = np.clip(spare[:, None] - before, 0, room)
    extra = np.zeros_like(extra_ranked)
    extra[:, order] = extra_ranked
    return (base + np.moveaxis(extra.reshape(n_b, n_l, n_k), 0, 1)).astype(np.int32)
