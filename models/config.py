"""Model hyper-parameters as small frozen data, read from HF ``config.json`` or GGUF metadata."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from kvlab.lib.rope import RopeConfig

# HF model_type -> kvlab family. Mistral and SmolLM2 are Llama-architecture checkpoints;
# "gemma3_text" (Gemma3ForCausalLM) and "gemma3" (its text_config) are family "gemma3".
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")

# Per-layer attention kinds (``ModelConfig.layer_types``).
LOCAL, GLOBAL = "sliding", "full"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder hyper-parameters (hashable: a static argument under ``jit``).

  Letters: V vocab, D model width, F MLP width, L layers, N query heads, K kv heads, H head dim.
  """

  family: str                 # "llama" | "mistral" | "qwen2" | "qwen3" | "gemma3"
  vocab_size: int             # V
  hidden_size: int            # D
  intermediate_size: int      # F
  num_layers: int             # L
  num_heads: int              # N
  num_kv_heads: int           # K
  head_dim: int               # H
  rms_norm_eps: float = 1e-6
  rope: RopeConfig | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  qkv_bias: bool = False      # Qwen2; Llama's attention_bias
  o_bias: bool = False        # Llama's attention_bias also biases o_proj
  mlp_bias: bool = False
  qk_norm: bool = False       # Qwen3
  sliding_window: int | None = None  # Mistral: every layer; with layer_types: LOCAL layers
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  # Gemma 3 (defaults leave the other families as they were):
  norm_offset: float = 0.0    # RMSNorms scale by (norm_offset + w): 1.0 for Gemma
  sandwich_norms: bool = False  # norms after attention and after the MLP too (Gemma 3)
  mlp_act: str = "silu"       # gated MLP activation: "silu" (SwiGLU) | "gelu_tanh" (GeGLU)
  embed_scale: bool = False   # embeddings times sqrt(D), in the compute dtype (Gemma)
  query_scale: float | None = None  # attention logit scale; None: H ** -0.5
  final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
  layer_types: tuple[str, ...] | None = None  # per layer LOCAL | GLOBAL; None: all alike
  rope_local: RopeConfig | None = None  # RoPE of the LOCAL layers (``rope``: the GLOBAL ones)

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.mlp_act not in ("silu", "gelu_tanh"):
      raise ValueError(f"mlp_act must be 'silu' or 'gelu_tanh', got {self.mlp_act!r}")
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers or set(self.layer_types) - {LOCAL, GLOBAL}:
        raise ValueError(f"layer_types must list {LOCAL!r} or {GLOBAL!r} for each of the "
                         f"{self.num_layers} layers, got {self.layer_types}")
      if LOCAL in self.layer_types and not self.sliding_window:
        raise ValueError(f"layer_types has {LOCAL!r} layers but sliding_window is not set")

  @property
  def hybrid(self) -> bool:
    """Whether layers differ in kind (Gemma 3: sliding-window local and global layers)."""
    return self.layer_types is not None

  @property
  def layer_windows(self) -> tuple[int, ...] | None:
    """Per layer: the sliding window of a LOCAL layer, 0 for a GLOBAL one; None unless
    ``hybrid`` (``KVCache.windows``: compression keeps a local layer's window)."""
    if not self.hybrid:
      return None
    return tuple(int(self.sliding_window) if t == LOCAL else 0 for t in self.layer_types)

  @property
  def group_size(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def num_params(self) -> int:
    d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
    qkvo = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = qkvo + 3 * d * f + (4 if self.sandwich_norms else 2) * d
    if self.qk_norm:
      per_layer += 2 * self.head_dim
    emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return l * per_layer + emb + d


def _eos_tuple(x) -> tuple[int, ...]:
  if x is None:
    return ()
  if isinstance(x, (list, tuple)):
    return tuple(int(i) for i in x)
  return (int(x),)


def rope_from_hf(cfg: Mapping[str, Any], head_dim: int) -> RopeConfig:
  """RopeConfig from HF fields ``rope_theta`` and ``rope_scaling`` (or ``rope_parameters``),
  with transformers' defaults for what a config leaves out (yarn: beta_fast 32, beta_slow 1,
  truncate; yarn/longrope: factor = max_position_embeddings / original length)."""
  scaling = cfg.get("rope_scaling") or {}
  params = cfg.get("rope_parameters") or {}  # transformers >= 5 writes this form
  theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
  if not scaling and params.get("rope_type", "default") != "default":
    scaling = params
  rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
  max_pos = cfg.get("max_position_embeddings", 4096)
  orig = scaling.get("original_max_position_embeddings")
  if rope_type in ("llama3", "yarn", "longrope") and cfg.get("original_max_position_embeddings"):
    orig = cfg["original_max_position_embeddings"]  # Phi-3 style: HF prefers the top-level one
  orig = int(orig or max_pos)
  factor = scaling.get("factor")
  if factor is None and rope_type in ("yarn", "longrope"):
    factor = max_pos / orig  # HF: the stretch implied by the two lengths
  opt = lambda key: None if scaling.get(key) is None else float(scaling[key])
  seq = lambda key: None if scaling.get(key) is None else tuple(float(x) for x in scaling[key])
  return RopeConfig(
      head_dim=head_dim,
      theta=float(theta),
      rope_type=rope_type,
      factor=float(1.0 if factor is None else factor),
      low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
      high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
      original_max_position=orig,
      beta_fast=float(scaling.get("beta_fast") or 32.0),  # HF: a missing or 0 value is 32
      beta_slow=float(scaling.get("beta_slow") or 1.0),
      truncate=bool(scaling.get("truncate", True)),
      mscale=opt("mscale"),
      mscale_all_dim=opt("mscale_all_dim"),
      attention_factor=opt("attention_factor"),
      short_factor=seq("short_factor"),
      long_factor=seq("long_factor"),
  )


def from_hf_config(cfg: Mapping[str, Any]) -> ModelConfig:
  """Builds a ModelConfig from a parsed HF ``config.json``; raises on unknown architectures."""
  model_type = cfg.get("model_type")
  if model_type in ("gemma3_text", "gemma3"):
    from kvlab.models.gemma3 import gemma3_from_hf  # pylint: disable=g-import-not-at-top
    return gemma3_from_hf(cfg)
  if model_type not in SUPPORTED_MODEL_TYPES:
    archs = cfg.get("architectures")
    raise ValueError(f"unknown architecture: model_type={model_type!r} (architectures={archs}). "
                     f"kvlab supports model_type in {SUPPORTED_MODEL_TYPES}.")
  n = int(cfg["num_attention_heads"])
  d = int(cfg["hidden_size"])
  head_dim = int(cfg.get("head_dim") or d // n)
  sliding = None
  if model_type == "mistral":
    sliding = cfg.get("sliding_window")
  elif model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
    raise ValueError(f"{model_type} with use_sliding_window=true is not supported yet; set it "
                     "to false in config.json (the released checkpoints use full attention)")
  attn_bias = bool(cfg.get("attention_bias", False))
  return ModelConfig(
      family=model_type,
      vocab_size=int(cfg["vocab_size"]),
      hidden_size=d,
      intermediate_size=int(cfg["intermediate_size"]),
      num_layers=int(cfg["num_hidden_layers"]),
      num_heads=n,
      num_kv_heads=int(cfg.get("num_key_value_heads") or n),
      head_dim=head_dim,
      rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      rope=rope_from_hf(cfg, head_dim),
      max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      qkv_bias=(model_type == "qwen2") or attn_bias,
      o_bias=attn_bias and model_type != "qwen2",
      mlp_bias=bool(cfg.get("mlp_bias", False)),
      qk_norm=model_type == "qwen3",
      sliding_window=int(sliding) if sliding else None,
      bos_token_id=cfg.get("bos_token_id"),
      eos_token_ids=_eos_tuple(cfg.get("eos_token_id")),
  )
