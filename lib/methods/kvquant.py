"""KVQuant (Hooper et al. 2024, METHODS.md §3.1): non-uniform 2-/3-/4-bit quantization of the
cache with pre-RoPE per-channel keys, per-token values, dense-and-sparse outliers and Q-Norm,
from an offline calibration (``experiments/calibrate_kvquant.py``).

All five parts are on (``lib.quant.kvquant_store`` holds the layout):
1. keys per channel with static calibrated ranges, 2. quantized **before** RoPE (un-rotated at
compression, rotated again by position when attention reads them), 3. per-layer LUTs from
Fisher-weighted k-means, 4. the ~1 % largest entries of every key and value vector kept in
float16 (``outlier_fraction``; fixed capacity: ``ceil(0.01 * head_dim)`` per vector),
5. Q-Norm folded into the 2-bit LUTs at calibration.

Choices:
* every prompt token is quantized (KVQuant keeps none in full precision; ``residual`` can keep
  the newest ones, default 0). Decoded tokens gather in the full-precision window and are
  quantized ``group`` (16) at a time inside the jitted decode loop (``lib.quant.store.flush``),
  so at most 31 of them are full precision at any step (the reference quantizes each on append).
* attention sinks: the reference's ``first_few_fp16`` is ``sink`` here, default 1 — the first
  token stays in full precision (its pre-RoPE key lies far outside the calibrated channel ranges
  on SmolLM2: 55 % relative error at 4 bit without it, vs 5 % for other tokens). Measured
  effect in README (KVQuant rows).
* RoPE is undone and redone with the frequencies stored in the calibration (the model's; for
  dynamic-NTK models, those at the calibration length), so KVQuant needs no prefill
  observations and also quantizes a cache compressed during prefill.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib.sharding import to_host
from kvlab.lib.cache import KVCache, round_capacity
from kvlab.lib.methods.base import check_at_least, check_types
from kvlab.lib.quant import nuq, packing
from kvlab.lib.quant import kvquant_calibrate as calib
from kvlab.lib.quant.kvquant_store import KVQuantStore
from kvlab.lib.quant.store import (check_plain, check_window, sink_slots, split_window,
                             take_slots)

# The committed calibration of the default model (experiments/calibrate_kvquant.py), found
# from the source tree whatever the working directory.
DEFAULT_CALIBRATION = os.path.normpath(os.path.join(
    os.path.dirname(__file__), "..", "..", "results", "calibration", "kvquant_smollm2-135m"))


@functools.lru_cache(maxsize=8)
def _load(path: str) -> calib.Calibration:
  return calib.load(path)


@dataclasses.dataclass(frozen=True)
class KVQuant:
  """``bits`` for keys and values; ``calibration`` the directory written by
  ``experiments/calibrate_kvquant.py`` (default: the committed one of SmolLM2-135M)."""

  bits: int = 3
  calibration: str = DEFAULT_CALIBRATION
  outlier_fraction: float = 0.01
  group: int = 16
  residual: int = 0
  sink: int = 1
  name = "kvquant"
  observe = None
  quantizes = True

  def __post_init__(self):
    check_types(self)
    if self.bits not in (2, 3, 4):
      raise ValueError(f"{self.name}: unsupported bit width {self.bits}: KVQuant's datatypes "
                       f"are 2, 3 or 4 bit, e.g. --method=snapkv+kvquant:bits=3")
    if not 0.0 <= self.outlier_fraction < 0.5:
      raise ValueError(f"{self.name}: outlier fraction must be in [0, 0.5), got "
                       f"{self.outlier_fraction} (KVQuant keeps 1 %: e.g. "
                       f"--method=snapkv+{self.name}:outlier_fraction=0.01)")
    nuq.outlier_count(64, self.outlier_fraction)  # validates the fraction
    check_at_least(self, "group", 1, "decoded tokens quantized at a time")
    if self.residual < 0 or self.residual % self.group:
      raise ValueError(f"{self.name}: residual ({self.residual}) must be a non-negative "
                       f"multiple of group ({self.group}): e.g. "
                       f"--method=snapkv+{self.name}:residual=0")
    check_window(self.name, self.group, self.residual)
    if self.sink < 0:
      raise ValueError(f"{self.name}: sink (tokens kept in full precision) must be >= 0, got "
                       f"{self.sink}: e.g. --method=snapkv+{self.name}:sink=1")

  def load_calibration(self) -> calib.Calibration:
    """The calibration (cached per path); raises a clear error if it is missing or damaged."""
    return _load(self.calibration)

  def apply(self, cache: KVCache, observations=None, *, extra: int = 0,
            block: int = 512) -> KVCache:
    """Quantizes every valid token (keeping the newest ``residual`` in full precision) and
    leaves ``extra`` free slots. Returns the cache with ``cache.quant`` a ``KVQuantStore``."""
    del block, observations
    check_plain(self.name, cache)
    cal = self.load_calibration()
    cal.check_shapes(cache.num_layers, cache.kv_heads, cache.head_dim)
    packing.check_packable(cache.head_dim, self.bits, "head dim")
    inv_freq = jnp.asarray(cal.inv_freq)
    lengths = to_host(cache.lengths)
    skip = to_host(_sinks(cache.positions, self.sink))
    n_q = np.maximum(lengths - skip - self.residual, 0)
    q_cap = -(-(int(n_q.max()) + extra) // 64) * 64  # 64 = a multiple of every group
    q_cap = max(q_cap, 64)
    res_cap = round_capacity(int((lengths - n_q).max()) + extra)
    n_out = nuq.outlier_count(cache.head_dim, self.outlier_fraction)
    arrays = (jnp.asarray(cal.lut("k", self.bits)), jnp.asarray(cal.lut("v", self.bits)),
              jnp.asarray(cal.k_offset), jnp.asarray(cal.k_range), inv_freq)
    return _split(self, cache, jnp.asarray(n_q, jnp.int32), jnp.asarray(skip, jnp.int32), arrays,
                  q_cap, res_cap, n_out)


@dataclasses.dataclass(frozen=True)
class KVQuant2(KVQuant):
  """KVQuant with 2-bit keys and values (Q-Norm on)."""

  bits: int = 2
  name = "kvquant2"


@dataclasses.dataclass(frozen=True)
class KVQuant4(KVQuant):
  """KVQuant with 4-bit keys and values."""

  bits: int = 4
  name = "kvquant4"


@functools.partial(jax.jit, static_argnames=("sink",))
def _sinks(positions, sink: int):
  return sink_slots(positions, sink)


@functools.partial(jax.jit, static_argnames=("method", "q_cap", "res_cap", "n_out"))
def _split(method: KVQuant, cache: KVCache, n_q, skip, arrays, q_cap: int, res_cap: int,
           n_out: int) -> KVCache:
  """Quantizes each head's ``n_q`` slots after its ``skip`` sink slots into a ``q_cap``-slot
  store; the sinks and the rest move to the front of a ``res_cap``-slot full-precision window."""
  k_lut, v_lut, k_off, k_rng, inv_freq = arrays
  take = lambda x: take_slots(x, skip, q_cap)
  quant = KVQuantStore.build(take(cache.keys), take(cache.values), take(cache.positions), n_q,
                             k_lut=k_lut, v_lut=v_lut, k_offset=k_off, k_range=k_rng,
                             inv_freq=inv_freq, n_outliers=n_out, group=method.group,
                             residual=method.residual, sink=method.sink)
  return split_window(cache, n_q, res_cap, quant, skip)
