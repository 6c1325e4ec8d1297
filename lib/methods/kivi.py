"""KIVI (Liu et al. 2024, METHODS.md §3.2): 2-/4-bit asymmetric quantization of the cache, keys
per channel (groups of ``group`` tokens), values per token (groups of ``group`` channels), the
newest tokens kept in full precision.

Choices (METHODS.md leaves the prefill split to the reference code):
* at compression, every (layer, row, head) quantizes its oldest ``floor((n - residual) / group)
  * group`` tokens; the residual window keeps the rest (``residual`` to ``residual + group - 1``
  tokens) in the cache's dtype. The reference flushes keys ``residual`` at a time and values
  one at a time; here both flush in whole key groups, so keys and values always split at the
  same token.
* tokens appended later enter the residual window; inside the jitted decode loop, whenever a
  head's window reaches ``residual + group`` tokens its oldest group is quantized
  (``lib.quant.store.flush``), so the window stays below ``residual + group``. A prompt
  appended in one call (the question) is flushed one group per decoded token after it.
  ``apply(extra=n)`` allocates room for n more tokens in the quantized part too.
* scales and zero-points are float16, as the reference; positions stay int32 (bytes counted).
* quantization composes after eviction only (``snapkv+kivi``): evict first, quantize the kept.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib.sharding import to_host
from kvlab.lib.cache import KVCache, round_capacity
from kvlab.lib.methods.base import check_at_least, check_types, warn
from kvlab.lib.quant import packing
from kvlab.lib.quant.store import (QuantStore, check_head_dim, check_plain, check_window, first_slots,
                             split_window)


@dataclasses.dataclass(frozen=True)
class KIVI:
  """``bits`` for keys and values, ``group`` tokens/channels per scale, ``residual`` newest
  tokens in full precision (a multiple of ``group``, as the reference asserts).

  ``prefill_key_bits``: only for ``quantize_each_chunk`` (``lib.online_quantized``), the bits the
  kept keys are packed at between chunks (they are re-grouped after every eviction, so their
  rounding would compound at ``bits``); they are packed to ``bits`` once, when the prefill ends.
  Values are packed at ``bits`` throughout (per token: re-packing reproduces their codes).
  ``prefill_key_bits=bits`` packs keys at ``bits`` after every chunk (the smallest peak)."""

  bits: int = 2
  group: int = 32
  residual: int = 128
  prefill_key_bits: int = 8
  name = "kivi"
  observe = None
  quantizes = True

  def __post_init__(self):
    check_types(self)
    for key in ("bits", "prefill_key_bits"):
      if getattr(self, key) not in packing.SUPPORTED_BITS:
        raise ValueError(f"{self.name}: unsupported bit width {getattr(self, key)} for {key}: "
                         f"choose one of {', '.join(map(str, packing.SUPPORTED_BITS))}, e.g. "
                         f"--method=snapkv+{self.name}:{key}={getattr(type(self), key)}")
    if self.prefill_key_bits < self.bits:
      raise ValueError(f"{self.name}: prefill_key_bits={self.prefill_key_bits} is below "
                       f"bits={self.bits}; use at least {self.bits}, e.g. "
                       f"--method=snapkv+{self.name}:prefill_key_bits=8")
    check_at_least(self, "group", 1, "tokens / channels per scale")
    if self.residual < 0 or self.residual % self.group:
      raise ValueError(f"{self.name}: residual ({self.residual}) must be a non-negative "
                       f"multiple of group ({self.group}): e.g. "
                       f"--method=snapkv+{self.name}:group={self.group}:residual="
                       f"{max(self.residual // self.group, 1) * self.group}")
    check_window(self.name, self.group, self.residual)

  def apply(self, cache: KVCache, observations=None, *, extra: int = 0,
            block: int = 512) -> KVCache:
    """Splits ``cache`` into packed codes (older tokens) + a full-precision residual window with
    ``extra`` free slots. Returns the quantized cache (``cache.quant`` set)."""
    del observations, block
    check_plain(self.name, cache)
    check_head_dim(cache.head_dim, self.bits, self.bits, self.group)
    lengths = to_host(cache.lengths)
    g = self.group
    n_q = np.maximum(lengths - self.residual, 0) // g * g
    q_cap = int(n_q.max())
    if q_cap == 0:
      n = int(lengths.max())
      warn(f"{self.name}: the {n} tokens it receives fit in its full-precision window "
           f"(residual {self.residual}, plus up to {g - 1} short of a group of {g}): nothing "
           f"is quantized: lower the residual (--method=snapkv+{self.name}:residual=0) or "
           f"compress longer prompts")
    res_cap = round_capacity(int((lengths - n_q).max()) + extra)
    if q_cap == 0 and extra == 0:  # nothing to quantize, now or later
      return cache
    if q_cap == 0:
      q_cap = g  # an empty group, so tokens decoded later can flush into the store
    return _split(self, cache, jnp.asarray(n_q, jnp.int32), q_cap, res_cap, extra)


@dataclasses.dataclass(frozen=True)
class KIVI4(KIVI):
  """KIVI with 4-bit keys and values."""

  bits: int = 4
  name = "kivi4"


@functools.partial(jax.jit, static_argnames=("method", "q_cap", "res_cap", "room"))
def _split(method: KIVI, cache: KVCache, n_q, q_cap: int, res_cap: int, room: int) -> KVCache:
  """Quantizes each head's first ``n_q`` slots (``q_cap`` = their max, + ``room`` free slots);
  the rest move to the front of a ``res_cap``-slot full-precision window."""
  take = lambda x: first_slots(x, q_cap)
  quant = QuantStore.build(take(cache.keys), take(cache.values), take(cache.positions), n_q,
                           k_bits=method.bits, v_bits=method.bits, group=method.group,
                           residual=method.residual).grown(room)
  return split_window(cache, n_q, res_cap, quant)
