"""Rotary position embeddings with the HF ``rope_scaling`` variants default/linear/dynamic/
llama3/yarn/longrope.

The layout is the HF "rotate half" one (first half of the head dim pairs with the second half).
YaRN and LongRoPE also scale cos and sin by an attention factor (``RopeConfig.attention_scale``,
the ``scale`` argument of ``apply_rope``): queries and keys both grow by it, so attention logits
grow by its square. ``rotate`` (re-rotating cached keys) never scales.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Static RoPE hyper-parameters (hashable, so usable as a jit static argument)."""

  head_dim: int
  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0      # llama3
  high_freq_factor: float = 4.0     # llama3
  original_max_position: int = 8192  # llama3 / dynamic / yarn / longrope
  beta_fast: float = 32.0           # yarn: rotations below which a dim is interpolated ...
  beta_slow: float = 1.0            # yarn: ... and above which it is left as is
  truncate: bool = True             # yarn: round the ramp's ends to whole dims
  mscale: float | None = None       # yarn (DeepSeek form of the attention factor)
  mscale_all_dim: float | None = None  # yarn
  attention_factor: float | None = None  # yarn / longrope: None = the paper's default
  short_factor: tuple[float, ...] | None = None  # longrope: [H/2] per-dim divisors, short ...
  long_factor: tuple[float, ...] | None = None   # ... and beyond original_max_position

  def __post_init__(self):
    if self.rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(f"rope_scaling type {self.rope_type!r} is not supported; kvlab supports "
                       f"{SUPPORTED_ROPE_TYPES}. Remove rope_scaling from config.json or add the "
                       f"variant to lib/rope.py.")
    if self.rope_type == "longrope":
      for name in ("short_factor", "long_factor"):
        f = getattr(self, name)
        if f is None or len(f) != self.head_dim // 2:
          raise ValueError(f"longrope needs {name} with head_dim / 2 = {self.head_dim // 2} "
                           f"entries, got {None if f is None else len(f)}")

  @property
  def attention_scale(self) -> float:
    """The factor on cos and sin (1.0 except for yarn and longrope)."""
    if self.attention_factor is not None:
      return float(self.attention_factor)
    if self.rope_type == "yarn":
      if self.mscale and self.mscale_all_dim:
        return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor,
                                                                     self.mscale_all_dim)
      return _yarn_mscale(self.factor)
    if self.rope_type == "longrope" and self.factor > 1.0:
      return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position))
    return 1.0


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature ``0.1 * mscale * ln(factor) + 1`` (1 when not stretched)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _theta_powers(cfg: RopeConfig) -> np.ndarray:
  """``[H/2]`` float32 ``theta ** (2i / H)`` (the inverse of the plain inverse frequencies),
  computed in float32 as HF does."""
  exps = np.arange(0, cfg.head_dim, 2).astype(np.float32) / np.float32(cfg.head_dim)
  return (np.float32(cfg.theta) ** exps).astype(np.float32)


def _yarn_inv_freq(cfg: RopeConfig) -> np.ndarray:
  """``[H/2]`` YaRN ("NTK-by-parts") inverse frequencies.

  Dims that turn fewer than ``beta_slow`` times over ``original_max_position`` are interpolated
  (divided by ``factor``), dims turning more than ``beta_fast`` times are kept, and a linear ramp
  over dim index blends the two in between."""
  d = cfg.head_dim
  pos_freqs = _theta_powers(cfg)  # theta ** (2i / H)
  extrap = (np.float32(1.0) / pos_freqs).astype(np.float32)
  interp = (np.float32(1.0) / (np.float32(cfg.factor) * pos_freqs)).astype(np.float32)

  def dim_of(rotations):  # the (fractional) dim index that turns `rotations` times
    return (d * math.log(cfg.original_max_position / (rotations * 2 * math.pi))) / (
        2 * math.log(cfg.theta))

  low, high = dim_of(cfg.beta_fast), dim_of(cfg.beta_slow)
  if cfg.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, d - 1)
  if low == high:
    high += 0.001  # a step, not a division by zero
  ramp = np.clip((np.arange(d // 2, dtype=np.float32) - np.float32(low))
                 / np.float32(high - low), 0, 1).astype(np.float32)
  keep = np.float32(1.0) - ramp  # weight of the unscaled frequency per dim
  return (interp * (np.float32(1.0) - keep) + extrap * keep).astype(np.float32)


def _longrope_inv_freq(cfg: RopeConfig, long: bool) -> np.ndarray:
  """``[H/2]`` LongRoPE inverse frequencies: each dim's divided by its short or long factor."""
  ext = np.asarray(cfg.long_factor if long else cfg.short_factor, np.float32)
  return (np.float32(1.0) / (ext * _theta_powers(cfg))).astype(np.float32)


def base_inv_freq(cfg: RopeConfig) -> np.ndarray:
  """``[H/2]`` float32 inverse frequencies after the static scaling (linear/llama3/yarn; the
  short factors of longrope; none for dynamic, whose scaling depends on the length)."""
  if cfg.rope_type == "yarn":
    return _yarn_inv_freq(cfg)
  if cfg.rope_type == "longrope":
    return _longrope_inv_freq(cfg, long=False)
  # float32 throughout, as HF computes it, so the phases agree to the last bit where possible.
  inv = (np.float32(1.0) / _theta_powers(cfg)).astype(np.float64)
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
  """``[H/2]`` inverse frequencies; for ``dynamic`` and ``longrope`` they depend on ``seq_len``
  (``[]``, the length the current call reaches).

  ``dynamic`` follows HF: once the sequence exceeds ``original_max_position`` the base grows to
  ``theta * (factor * seq_len / orig - (factor - 1)) ** (H / (H - 2))``. ``longrope`` switches
  from its short to its long factors there. We evaluate both at the length of the current call
  (HF keeps the largest length seen for dynamic; the two agree for a prefill from an empty
  cache, which is what the parity tests check).
  """
  inv = jnp.asarray(base_inv_freq(cfg))
  if seq_len is None or cfg.rope_type not in ("dynamic", "longrope"):
    return inv
  seq_len = jnp.asarray(seq_len, jnp.float32)
  if cfg.rope_type == "longrope":
    return jnp.where(seq_len > cfg.original_max_position,
                     jnp.asarray(_longrope_inv_freq(cfg, long=True)), inv)
  d = cfg.head_dim
  base = cfg.theta * ((cfg.factor * seq_len / cfg.original_max_position) - (cfg.factor - 1)) ** (
      d / (d - 2))
  dyn = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  return jnp.where(seq_len > cfg.original_max_position, dyn, inv)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
               scale: float = 1.0) -> jax.Array:
  """Rotates ``x [B, T, heads, H]`` by ``positions [B, T]`` with ``inv_freq [H/2]``, cos and sin
  times ``scale`` (``RopeConfig.attention_scale``); returns the same shape and dtype."""
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  cos = jnp.cos(ang)[:, :, None, :]
  sin = jnp.sin(ang)[:, :, None, :]
  if not isinstance(scale, (int, float)) or scale != 1.0:  # a traced [] scale: per layer
    cos, sin = cos * jnp.asarray(scale, jnp.float32), sin * jnp.asarray(scale, jnp.float32)
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
