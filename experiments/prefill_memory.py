r"""Peak host memory of prefilling one long prompt: ``python -m experiments.prefill_memory``.

Prints one JSON line: prompt length, chunk size, cache bytes (from the leaves) and the process's
peak resident memory (``ru_maxrss``), which includes the fp32 weights and the XLA runtime.
With ``--method``, the cache is compressed to ``--ratio`` either after the prefill (the full
cache exists first) or, with ``--compress_during_prefill``, after every chunk (the cache never
holds more than budget + one chunk). Run one mode per process: ``ru_maxrss`` is a high-water mark.
"""

import json
import resource
import time

from absl import app, flags
import jax
import jax.numpy as jnp

import models
from lib import generate as gen
from lib import methods
from lib.data.text import text_of_tokens
from lib.online import online_capacity, prefill_compressing

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model to load.")
flags.DEFINE_integer("length", 4096, "Prompt tokens (real stdlib-docs text).")
flags.DEFINE_integer("chunk_size", 512, "Prefill chunk.")
flags.DEFINE_string("method", None, "Compress with this method (else: full cache only).")
flags.DEFINE_float("ratio", 0.25, "Fraction kept, with --method.")
flags.DEFINE_bool("compress_during_prefill", False, "Compress after every chunk.")


def main(argv):
  del argv
  m = models.load(FLAGS.model, progress=False)
  c = m.config
  ids = text_of_tokens(m.tokenizer, FLAGS.length)
  tokens, lengths = gen.pad_batch([ids], FLAGS.chunk_size)
  gen.check_context(lengths, 1, c.max_position_embeddings)
  weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(m.params))
  rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  t = time.perf_counter()
  method = methods.make(FLAGS.method, ratio=FLAGS.ratio) if FLAGS.method else None
  if method is not None and FLAGS.compress_during_prefill:
    cap, kept = online_capacity(method, lengths, FLAGS.chunk_size, c.num_layers, c.num_kv_heads)
    logits, cache = prefill_compressing(
        m.params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(kept, jnp.int32),
        apply_fn=m.apply_fn, chunk_size=FLAGS.chunk_size, method=method, capacity=cap,
        dtype=m.dtype, num_layers=c.num_layers, kv_heads=c.num_kv_heads, head_dim=c.head_dim)
    peak_cache = cache.nbytes  # the cache is this size throughout
    final = cache
  else:
    cache = m.new_cache(1, tokens.shape[1])
    peak_cache = cache.nbytes
    observe = None if method is None else method.observe
    logits, cache, obs = gen.prefill(m.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                                     apply_fn=m.apply_fn, chunk_size=FLAGS.chunk_size,
                                     observe=observe)
    final = cache if method is None else methods.compress(method, cache, obs)
  jax.block_until_ready((logits, final))
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps({
      "prompt_tokens": len(ids), "chunk_size": FLAGS.chunk_size, "method": FLAGS.method,
      "ratio": FLAGS.ratio if FLAGS.method else 1.0,
      "compress_during_prefill": FLAGS.compress_during_prefill,
      "peak_cache_bytes": peak_cache, "final_cache_bytes": final.nbytes, "weight_bytes": weights,
      "rss_after_load_bytes": rss_loaded, "peak_rss_bytes": peak,
      "peak_rss_gib": round(peak / 2**30, 3),
      "seconds_incl_compile": round(time.perf_counter() - t, 2)}))


if __name__ == "__main__":
  app.run(main)
