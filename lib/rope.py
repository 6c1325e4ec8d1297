"""Rotary position embeddings with the HF ``rope_scaling`` variants default/linear/dynamic/llama3.

The layout is the HF "rotate half" one (first half of the head dim pairs with the second half).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Static RoPE hyper-parameters (hashable, so usable as a jit static argument)."""

  head_dim: int
  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0      # llama3
  high_freq_factor: float = 4.0     # llama3
  original_max_position: int = 8192  # llama3 / dynamic

  def __post_init__(self):
    if self.rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(f"rope_scaling type {self.rope_type!r} is not supported; kvlab supports "
                       f"{SUPPORTED_ROPE_TYPES}. Remove rope_scaling from config.json or add the "
                       f"variant to lib/rope.py.")


def base_inv_freq(cfg: RopeConfig) -> np.ndarray:
  """``[H/2]`` float32 inverse frequencies after the static (linear/llama3) scaling."""
  # float32 throughout, as HF computes it, so the phases agree to the last bit where possible.
  exps = np.arange(0, cfg.head_dim, 2).astype(np.float32) / np.float32(cfg.head_dim)
  inv = (np.float32(1.0) / (np.float32(cfg.theta) ** exps)).astype(np.float64)
  if cfg.rope_type == "linear":
    inv = inv / cfg.factor
  elif cfg.rope_type == "llama3":
    low_wavelen = cfg.original_max_position / cfg.low_freq_factor
    high_wavelen = cfg.original_max_position / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / cfg.factor, inv)
    smooth = (cfg.original_max_position / wavelen - cfg.low_freq_factor) / (
        cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def inv_freq_for(cfg: RopeConfig, seq_len: jax.Array | int | None = None) -> jax.Array:
  """``[H/2]`` inverse frequencies; for ``dynamic`` NTK scaling they depend on ``seq_len``.

  ``dynamic`` follows HF: once the sequence exceeds ``original_max_position`` the base grows to
  ``theta * (factor * seq_len / orig - (factor - 1)) ** (H / (H - 2))``. We evaluate it at the
  length of the current call (HF keeps the largest length seen; the two agree for a prefill
  from an empty cache, which is what the parity tests check).
  """
  inv = jnp.asarray(base_inv_freq(cfg))
  if cfg.rope_type != "dynamic" or seq_len is None:
    return inv
  seq_len = jnp.asarray(seq_len, jnp.float32)
  d = cfg.head_dim
  base = cfg.theta * ((cfg.factor * seq_len / cfg.original_max_position) - (cfg.factor - 1)) ** (
      d / (d - 2))
  dyn = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  return jnp.where(seq_len > cfg.original_max_position, dyn, inv)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates ``x [B, T, heads, H]`` by ``positions [B, T]``; returns the same shape and dtype."""
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  cos = jnp.cos(ang)[:, :, None, :]
  sin = jnp.sin(ang)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def rotate(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates ``x [..., S, H]`` by per-slot ``positions [..., S]`` (any leading axes, e.g.
  ``[L, B, K, S, H]`` cache slots); negative positions undo a rotation. Returns float32."""
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., S, H/2]
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
