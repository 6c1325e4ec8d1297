"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), jit-friendly."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Draws one token per row from ``logits [B, V]``; returns ``[B]`` int32."""
  if cfg.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  x = logits.astype(jnp.float32) / cfg.temperature
  if cfg.top_k > 0:
    kth = jax.lax.top_k(x, cfg.top_k)[0][:, -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if cfg.top_p < 1.0:
    order = jnp.argsort(-x, axis=-1)
    sorted_x = jnp.take_along_axis(x, order, axis=-1)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = cum_before < cfg.top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
    x = jnp.where(keep, x, -jnp.inf)
  return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)
