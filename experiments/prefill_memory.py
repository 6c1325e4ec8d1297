r"""Peak host memory of prefilling one long prompt: ``python -m experiments.prefill_memory``.

Prints one JSON line: prompt length, chunk size, cache bytes (from the leaves) and the process's
peak resident memory (``ru_maxrss``), which includes the fp32 weights and the XLA runtime.
"""

import json
import resource
import time

from absl import app, flags
import jax.numpy as jnp

import models
from lib import generate as gen
from lib.data.text import text_of_tokens

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model to load.")
flags.DEFINE_integer("length", 4096, "Prompt tokens (real stdlib-docs text).")
flags.DEFINE_integer("chunk_size", 512, "Prefill chunk.")


def main(argv):
  del argv
  m = models.load(FLAGS.model, progress=False)
  ids = text_of_tokens(m.tokenizer, FLAGS.length)
  tokens, lengths = gen.pad_batch([ids], FLAGS.chunk_size)
  gen.check_context(lengths, 1, m.config.max_position_embeddings)
  cache = m.new_cache(1, tokens.shape[1])
  t = time.perf_counter()
  logits, cache, _ = gen.prefill(m.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                                 apply_fn=m.apply_fn, chunk_size=FLAGS.chunk_size)
  logits.block_until_ready()
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(json.dumps({
      "prompt_tokens": len(ids), "chunk_size": FLAGS.chunk_size,
      "cache_bytes": cache.nbytes, "weight_bytes": sum(
          x.nbytes for x in __import__("jax").tree_util.tree_leaves(m.params)),
      "peak_rss_bytes": peak_kib * 1024, "peak_rss_gib": round(peak_kib / 2**20, 3),
      "prefill_s_incl_compile": round(time.perf_counter() - t, 2)}))


if __name__ == "__main__":
  app.run(main)
