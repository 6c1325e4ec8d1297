"""Tiny random HF checkpoints made with transformers, saved as safetensors (test-only)."""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

_COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               initializer_range=0.15, rms_norm_eps=1e-5)

# name -> (config class, overrides)
CONFIGS = {
    "llama": ("LlamaConfig", dict(rope_theta=10000.0, tie_word_embeddings=False)),
    "llama_tied_bias": ("LlamaConfig", dict(tie_word_embeddings=True, attention_bias=True,
                                            mlp_bias=True, num_key_value_heads=4)),
    "llama3_rope": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "linear_rope": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "dynamic_rope": ("LlamaConfig", dict(max_position_embeddings=16, rope_scaling={
        "rope_type": "dynamic", "factor": 2.0})),
    "mistral": ("MistralConfig", dict(sliding_window=8, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False, use_sliding_window=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True, use_sliding_window=False)),
}


def make_checkpoint(name: str, path: str, seed: int = 0):
  """Creates and saves a tiny random model; returns the (eval, fp32, eager) torch model."""
  cls_name, over = CONFIGS[name]
  cfg = getattr(transformers, cls_name)(**{**_COMMON, **over})
  cfg._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
  model = model.float().eval()
  # Non-trivial norm weights so a missed norm cannot pass.
  with torch.no_grad():
    for n, p in model.named_parameters():
      if n.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif n.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path, safe_serialization=True)
  return model


def hf_greedy(model, ids, steps):
  """transformers' logits of the prompt ``ids`` ``[T, V]``, then ``steps`` greedy decode steps
  with its KV cache: ``(prompt logits, tokens [steps + 1], step logits [steps, V] or None)``."""
  with torch.no_grad():
    out = model(torch.tensor([ids]), use_cache=True)
    pkv, prefill = out.past_key_values, out.logits[0].numpy()
    tok = int(prefill[-1].argmax())
    toks, logits = [tok], []
    for _ in range(steps):
      out = model(torch.tensor([[tok]]), past_key_values=pkv, use_cache=True)
      pkv = out.past_key_values
      lg = out.logits[0, -1].numpy()
      logits.append(lg)
      tok = int(lg.argmax())
      toks.append(tok)
  return prefill, toks, np.stack(logits) if logits else None


def kvlab_greedy_steps(m, cache, tok: int, steps: int):
  """``steps`` greedy kvlab decode steps of one row from ``cache`` after first token ``tok``:
  ``(tokens [steps + 1], step logits [steps, V])``, as ``hf_greedy`` returns them."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kvlab.lib import generate as gen  # pylint: disable=g-import-not-at-top
  toks, logits = [tok], []
  for _ in range(steps):
    lg, cache = gen.decode_step(m.params, jnp.asarray([tok], jnp.int32), cache,
                                apply_fn=m.apply_fn)
    logits.append(np.asarray(lg[0]))
    tok = int(np.argmax(lg[0]))
    toks.append(tok)
  return toks, np.stack(logits)
