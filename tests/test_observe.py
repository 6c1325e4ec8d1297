"""The per-layer observation hook runs inside prefill and sees what the cache receives."""

import jax.numpy as jnp
import numpy as np

from kvlab import models
from kvlab.lib import generate as gen


def key_norms(layer, x, cache):
  """Per-layer hook: ``[B, K, T]`` L2 norms of the new keys, and the layer index."""
  del cache
  return {"layer": layer, "knorm": jnp.linalg.norm(x.k, axis=-1),
          "pre_norm": jnp.linalg.norm(x.k_pre, axis=-1)}


def test_observe_hook_is_stacked_per_chunk_and_layer(tiny_dir):
  path, _ = tiny_dir("llama")
  m = models.load(path, progress=False, attn_block_size=8)
  ids = list(range(7, 27))  # 20 tokens -> 3 chunks of 8
  tokens, lengths = gen.pad_batch([ids], 8)
  cache = m.new_cache(1, 32)
  logits, cache, obs = gen.prefill(m.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                                   apply_fn=m.apply_fn, chunk_size=8, observe=key_norms)
  c = m.config
  assert obs["knorm"].shape == (3, c.num_layers, 1, c.num_kv_heads, 8)
  np.testing.assert_array_equal(obs["layer"][0], np.arange(c.num_layers))
  # The observed keys are exactly what landed in the cache.
  seen = np.asarray(obs["knorm"]).transpose(1, 2, 3, 0, 4).reshape(c.num_layers, 1,
                                                                    c.num_kv_heads, 24)[..., :20]
  stored = np.linalg.norm(np.asarray(cache.keys[..., :20, :]), axis=-1)
  np.testing.assert_allclose(seen, stored, rtol=1e-6)
  # RoPE is a rotation: pre-RoPE keys have the same norms.
  np.testing.assert_allclose(np.asarray(obs["pre_norm"]), np.asarray(obs["knorm"]), rtol=1e-5)
  # Observing changes nothing about the forward pass.
  plain, _, _ = gen.prefill(m.params, jnp.asarray(tokens), jnp.asarray(lengths),
                            m.new_cache(1, 32), apply_fn=m.apply_fn, chunk_size=8)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain))
