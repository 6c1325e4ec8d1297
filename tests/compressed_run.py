"""Shared by the compression tests: prefill a tiny model, compress, decode greedily."""

import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib import generate as gen
from kvlab.lib import methods


def run_compressed(lm, method, prompts, steps=8, chunk=16):
  """Prefills ``prompts`` (token lists), compresses with ``method`` (room for ``steps`` more
  tokens), decodes ``steps`` greedy tokens and one more step.

  Returns ``(tokens [B, steps], logits of the last step [B, V], compressed cache, cache before
  compression)``.
  """
  tokens, lengths = gen.pad_batch(prompts, chunk)
  cache = lm.new_cache(len(prompts), tokens.shape[1])
  first, cache, obs = gen.prefill(lm.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                                  apply_fn=lm.apply_fn, chunk_size=chunk, observe=method.observe)
  small = methods.compress(method, cache, obs, extra=steps + 8)
  toks, _, final = gen.decode_loop(lm.params, jax.tree.map(jnp.copy, small), first,
                                   jax.random.PRNGKey(0), apply_fn=lm.apply_fn,
                                   max_new_tokens=steps)
  logits, _ = gen.decode_step(lm.params, toks[:, -1], final, apply_fn=lm.apply_fn)
  return np.asarray(toks), np.asarray(logits), small, cache
