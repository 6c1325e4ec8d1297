"""xKV (Chang et al. 2025, METHODS.md §4.1): one SVD basis shared by groups of adjacent layers,
over their pre-RoPE prefill keys and values; the cache keeps token factors and per-layer right
factors (``lib.lowrank.store``) and attention reconstructs blocks and re-applies RoPE.

Choices:
* ranks are fractions of a group's features (``group * kv_heads * head_dim``): ``rank_k=0.125``,
  ``rank_v=0.1875``, the reference's xKV-4 on Llama-3.1-8B (512 and 768 of 4096) — on SmolLM2
  (768 features per group of 4) that is rank 96 and 144. An integer > 1 is an absolute rank.
* exact SVD in float32 per batch row (``jnp.linalg.svd``); the reference also offers a
  randomized one.
* decoded tokens stay in full precision (the reference compresses the prefill only).
* when ``layers_per_group`` does not divide the layers (SmolLM2 has 30), the last group is
  shorter (its SVD runs over fewer layers).
* xKV needs the same tokens in every layer and head (one token factor serves them all): it
  runs on the full cache or after a layer- and head-uniform eviction (``streaming_llm+xkv``);
  after per-head eviction it raises. It takes the cache's stored-part slot, so it does not
  compose with a quantizer.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kvlab.lib.cache import KVCache, round_capacity
from kvlab.lib.lowrank.store import LowRankStore, factor
from kvlab.lib.methods.base import check_at_least, check_types
from kvlab.lib.quant.store import check_plain, check_uniform_tokens, first_slots
from kvlab.lib.rope import rotate


def _observe(layer, x, cache):
  """Records the RoPE inverse frequencies ``[H/2]`` (to un-rotate and re-rotate keys)."""
  del layer, cache
  return x.inv_freq


@dataclasses.dataclass(frozen=True)
class XKV:
  """``layers_per_group`` adjacent layers share a basis; ``rank_k``, ``rank_v`` as fractions of
  the group's features (<= 1) or absolute ranks (> 1)."""

  layers_per_group: int = 4
  rank_k: float = 0.125
  rank_v: float = 0.1875
  name = "xkv"
  quantizes = True  # keeps every token (changes its representation): composes last

  def __post_init__(self):
    check_types(self)
    check_at_least(self, "layers_per_group", 1, "adjacent layers sharing a basis")
    for key in ("rank_k", "rank_v"):
      r = getattr(self, key)
      if r <= 0 or (r > 1 and r != int(r)):
        raise ValueError(f"xkv: ranks must be positive (a fraction <= 1 or a whole rank), got "
                         f"{key}={r}: e.g. --method=xkv:{key}=0.125 or --method=xkv:{key}=96")

  @property
  def observe(self):
    return _observe

  def ranks(self, cache: KVCache) -> tuple[int, int]:
    feats = min(self.layers_per_group, cache.num_layers) * cache.kv_heads * cache.head_dim
    as_rank = lambda r: int(round(r * feats)) if r <= 1 else int(r)
    return max(as_rank(self.rank_k), 1), max(as_rank(self.rank_v), 1)

  def apply(self, cache: KVCache, observations=None, *, extra: int = 0,
            block: int = 512) -> KVCache:
    """Factors every valid token of ``cache`` (must be uniform over layers and heads); leaves a
    full-precision window of ``extra`` slots. Returns the cache with a ``LowRankStore``."""
    del block
    check_plain(self.name, cache)
    if observations is None:
      raise ValueError("xkv re-applies RoPE with the frequencies it records during prefill: "
                       "prefill with observe=method.observe and pass the observations")
    n = check_uniform_tokens(self.name, "one token factor serves them all", cache)
    inv_freq = jnp.asarray(observations).reshape(-1, observations.shape[-1])[-1]
    cap = max(-(-n // 64) * 64, 64)
    rk, rv = self.ranks(cache)
    return _factor_cache(self, cache, inv_freq, cap, round_capacity(extra), rk, rv)


@functools.partial(jax.jit, static_argnames=("method", "cap", "res_cap", "rk", "rv"))
def _factor_cache(method: XKV, cache: KVCache, inv_freq, cap: int, res_cap: int, rk: int,
                  rv: int) -> KVCache:
  l, b, k, _, h = cache.keys.shape
  g = min(method.layers_per_group, l)
  lp = -(-l // g) * g  # the last group may be short: padded with zero layers (no effect on SVD)
  take = lambda x: first_slots(x, cap)
  pos = take(cache.positions)
  valid = pos[0, :, 0] >= 0  # [B, Q] (the same for every layer and head)
  k_pre = rotate(take(cache.keys), jnp.maximum(pos, 0), -inv_freq)  # un-rotate: [L, B, K, Q, H]

  def grouped(x):  # [L, B, K, Q, H] -> [C, B, Q, G, K*H]
    x = jnp.pad(x, [(0, lp - l)] + [(0, 0)] * 4)
    x = x.reshape(lp // g, g, b, k, cap, h).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(lp // g, b, cap, g, k * h)

  def per_group(x, rank):
    coef, basis = jax.vmap(lambda xg: factor(xg, valid, rank))(grouped(x))
    # basis [C, G, B, r, F] -> [L, B, r, F]
    return coef.astype(cache.keys.dtype), basis.reshape(lp, b, rank, k * h)[:l].astype(
        cache.keys.dtype)

  k_coef, k_basis = per_group(k_pre, rk)
  v_coef, v_basis = per_group(take(cache.values), rv)
  store = LowRankStore(k_coef=k_coef, k_basis=k_basis, v_coef=v_coef, v_basis=v_basis,
                       positions=pos, lengths=cache.lengths, inv_freq=inv_freq,
                       layers_per_group=g)
  shape = (l, b, k, res_cap)
  return cache.replace(keys=jnp.zeros(shape + (h,), cache.keys.dtype),
                       values=jnp.zeros(shape + (h,), cache.values.dtype),
                       positions=jnp.full(shape, -1, jnp.int32),
                       lengths=jnp.zeros(shape[:3], jnp.int32), scores=None, quant=store)
