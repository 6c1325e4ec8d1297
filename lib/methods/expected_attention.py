"""Expected attention (kvpress ``ExpectedAttentionPress``): score keys by the attention that
*future* queries are expected to pay them.

Query statistics (mean and covariance of pre-RoPE queries, first ``sinks`` tokens excluded) are
accumulated chunk by chunk during prefill (sums and outer-product sums, so chunking is exact).
The RoPE rotation averaged over the next ``future`` positions is applied to them; with a
Gaussian query model, ``E[exp(q.k / sqrt(d))] = exp(mu.k / sqrt(d) + k^T Sigma k / (2 d))``,
softmaxed over keys, averaged over each GQA group (``gqa="max"``: their max) and scaled by
``||v||``. Sinks are always kept. Choices follow kvpress 0.5.5 defaults: future 512, sinks 4,
covariance and value norm on, group mean.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from kvlab.lib.cache import KVCache
from kvlab.lib.methods.base import Method, check_at_least, reduce_group, sinks_note


@functools.lru_cache(maxsize=None)
def query_moments(sinks: int):
  """Observe hook: per chunk ``{"s1": [B, N, H], "s2": [B, N, H, H], "n": [B],
  "inv_freq": [H/2]}`` sums over real, non-sink queries (pre-RoPE)."""

  def observe(layer, x, cache):
    del layer, cache
    w = (x.valid & (x.positions >= sinks)).astype(jnp.float32)  # [B, T]
    q = x.q_pre.astype(jnp.float32) * w[:, :, None, None]
    return {"s1": q.sum(1), "s2": jnp.einsum("BTNH,BTNJ->BNHJ", q, x.q_pre.astype(jnp.float32)),
            "n": w.sum(1), "inv_freq": x.inv_freq}

  return observe


def mean_rotation(inv_freq: jax.Array, start: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
  """Mean over positions ``start .. start+count-1`` of RoPE's cos and sin, ``[B, H]`` each
  (rotate-half layout: the rotation is ``cos * x + sin * rotate_half(x)``)."""
  p = start[:, None].astype(jnp.float32) + jnp.arange(count, dtype=jnp.float32)[None]  # [B, F]
  ang = p[:, :, None] * inv_freq[None, None, :]  # [B, F, H/2]
  c, s = jnp.cos(ang).mean(1), jnp.sin(ang).mean(1)
  return jnp.concatenate([c, c], -1), jnp.concatenate([s, s], -1)


def _rotate(cos, sin, h):
  """``[B, H, H]`` matrix R with ``R x = cos * x + sin * rotate_half(x)``."""
  half = h // 2
  p = jnp.zeros((h, h), jnp.float32)
  p = p.at[half:, :half].set(jnp.eye(half)).at[:half, half:].set(-jnp.eye(half))
  return cos[:, :, None] * jnp.eye(h)[None] + sin[:, :, None] * p[None]


@dataclasses.dataclass(frozen=True)
class ExpectedAttention(Method):
  """See module docstring."""

  future: int = 512
  sinks: int = 4
  use_covariance: bool = True
  use_vnorm: bool = True
  gqa: str = "mean"
  name = "expected_attention"

  def __post_init__(self):
    super().__post_init__()
    check_at_least(self, "future", 1, "future positions the RoPE rotation is averaged over")
    check_at_least(self, "sinks", 0, "first tokens always kept")

  def budget_notes(self, lengths, kept):
    return sinks_note(self, lengths, kept, "by score")

  @property
  def observe(self):
    return query_moments(self.sinks)

  def accumulate(self, acc, obs):
    """Running query moments over chunks (compress-during-prefill): sums add, RoPE stays."""
    return {"s1": acc["s1"] + obs["s1"], "s2": acc["s2"] + obs["s2"], "n": acc["n"] + obs["n"],
            "inv_freq": obs["inv_freq"]}

  def scores(self, cache: KVCache, obs):
    s1, s2, n = obs["s1"].sum(0), obs["s2"].sum(0), obs["n"].sum(0)  # [L,B,N,H], ..., [L,B]
    inv_freq = obs["inv_freq"][-1]  # [L, H/2]: per layer (Gemma 3's local/global RoPE)
    n = jnp.maximum(n, 1.0)  # [L, B]
    mu = s1 / n[..., None, None]  # [L, B, N, H]
    cov = s2 / n[..., None, None, None] - jnp.einsum("LBNH,LBNJ->LBNHJ", mu, mu)
    h = cache.head_dim
    rotation = lambda f: _rotate(*mean_rotation(f, cache.next_position, self.future), h)
    r = jax.vmap(rotation)(inv_freq)  # [L, B, H, H]
    mu = jnp.einsum("LBHJ,LBNJ->LBNH", r, mu)
    cov = jnp.einsum("LBHJ,LBNJI,LBKI->LBNHK", r, cov, r)
    kh, nh = cache.kv_heads, mu.shape[2]
    g = nh // kh

    def one_layer(args):
      m, c, keys, vals, lens, pos = args  # [B,N,H], [B,N,H,H], [B,K,S,H], .., [B,K], [B,K,S]
      k = keys.astype(jnp.float32)
      mg = m.reshape(m.shape[0], kh, g, h)
      z = jnp.einsum("BKGH,BKSH->BKGS", mg, k) / math.sqrt(h)
      if self.use_covariance:
        cg = c.reshape(c.shape[0], kh, g, h, h)
        z = z + jnp.einsum("BKSH,BKGHJ,BKSJ->BKGS", k, cg, k) / (2 * h)
      valid = (jnp.arange(k.shape[2])[None, None] < lens[..., None]) & (pos >= self.sinks)
      z = jnp.where(valid[:, :, None], z, -jnp.inf)
      p = reduce_group(jnp.where(valid[:, :, None], jax.nn.softmax(z, -1), 0.0), self.gqa,
                       2)  # [B, K, S]
      if self.use_vnorm:
        p = p * jnp.linalg.norm(vals.astype(jnp.float32), axis=-1)
      return jnp.where((pos < self.sinks) & (pos >= 0), jnp.inf, p)

    return jax.lax.map(one_layer, (mu, cov, cache.keys, cache.values, cache.lengths,
                                   cache.positions))
