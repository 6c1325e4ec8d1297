r"""Peak host memory of prefilling one long prompt: ``python -m experiments.prefill_memory``.

Prints one JSON line: prompt length, chunk size, cache bytes (from the leaves), the process's
peak resident memory over its life (``VmHWM``: loading the weights can set it) and during
the prefill alone (sampled every 5 ms); both include the fp32 weights and the XLA runtime.
With ``--method``, the cache is compressed to ``--ratio`` either after the prefill (the full
cache exists first) or, with ``--compress_during_prefill``, after every chunk (the cache never
holds more than budget + one chunk). Run one mode per process: ``VmHWM`` is a high-water mark.

``--batch=B`` prefills B prompts of different lengths (``length``, ``length - 64``, ...). Under a
memory limit (``prlimit --as=...``, a cgroup, the available RAM or ``KVLAB_MEMORY_LIMIT_GIB``
in its place, or an accelerator's memory) a cache that does not fit stops before the prefill
with one clear error (exit code 2, and a JSON line with ``"error"``).
"""

import json
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from kvlab import models
from kvlab.lib import distributed, flag_checks, sharding
from kvlab.lib import generate as gen
from kvlab.lib import methods
from kvlab.lib.data.text import text_of_tokens
from kvlab.lib import memory
from kvlab.lib.memory import explain_oom
from kvlab.lib.online import prefill_context_compressing
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
distributed.define_flags()
flags.DEFINE_string("model", "smollm2-135m", "Model to load.")
flags.DEFINE_integer("length", 4096, "Prompt tokens (real stdlib-docs text).")
flags.DEFINE_integer("chunk_size", 512, "Prefill chunk.")
flags.DEFINE_string("method", None, "Compress with this method (else: full cache only).")
flags.DEFINE_float("ratio", 0.25, "Fraction kept, with --method.")
flags.DEFINE_bool("compress_during_prefill", False, "Compress after every chunk.")
flags.DEFINE_bool("quantize_each_chunk", False, "With --compress_during_prefill and an "
                  "evict+kivi method: quantize what is kept after every chunk too.")
flags.DEFINE_integer("batch", 1, "Prompts prefilled together (lengths length, length-64, ...).")

flag_checks.at_least("length", 1)
flag_checks.at_least("chunk_size", 8)
flag_checks.at_least("batch", 1)
flags.register_validator("ratio", lambda v: 0 < v <= 1, "must be in (0, 1]")
flag_checks.method_specs("method", "ratio", optional=True)


def main(argv):
  del argv
  launch_config.apply()
  distributed.initialize_from_flags()
  m = models.load(FLAGS.model, progress=False)
  m, _ = sharding.place_model(m, FLAGS.mesh)
  c = m.config
  ids = text_of_tokens(m.tokenizer, FLAGS.length)
  prompts = [ids[: max(len(ids) - 64 * i, 1)] for i in range(FLAGS.batch)]
  tokens, lengths = gen.pad_batch(prompts, FLAGS.chunk_size)
  gen.check_context(lengths, 1, c.max_position_embeddings)
  weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(m.params))
  rss_loaded = memory.peak_resident_bytes()
  rss_now = memory.resident_bytes()
  t = time.perf_counter()
  method = methods.make(FLAGS.method, ratio=FLAGS.ratio) if FLAGS.method else None
  row = {"prompt_tokens": len(ids), "batch": FLAGS.batch, "chunk_size": FLAGS.chunk_size,
         "method": FLAGS.method, "ratio": FLAGS.ratio if FLAGS.method else 1.0,
         "compress_during_prefill": FLAGS.compress_during_prefill,
         "quantize_each_chunk": FLAGS.quantize_each_chunk}
  fix = ("compress while prefilling (--compress_during_prefill --method=...), or lower "
         "--batch or --length")
  try:
    with explain_oom(f"prefilling {FLAGS.batch} x {len(ids)} tokens", fix), \
        memory.PeakRSS() as during:
      _prefill(m, method, prompts, tokens, lengths, row)
  except MemoryError as e:
    print(json.dumps({**row, "error": str(e)}))
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  peak = memory.peak_resident_bytes()
  print(json.dumps({
      **row, "weight_bytes": weights, "rss_after_load_bytes": rss_loaded,
      "rss_before_prefill_bytes": rss_now, "peak_rss_prefill_bytes": during.peak_bytes,
      "peak_rss_prefill_gib": round(during.peak_bytes / 2**30, 3), "peak_rss_bytes": peak,
      "peak_rss_gib": round(peak / 2**30, 3),
      "seconds_incl_compile": round(time.perf_counter() - t, 2)}))


def _prefill(m, method, prompts, tokens, lengths, row):
  """Prefills (and compresses) in the chosen mode; adds the cache's byte counts to ``row``."""
  c = m.config
  if method is not None and FLAGS.compress_during_prefill:
    final, _, peak_cache = prefill_context_compressing(  # the scan's cache: its peak
        m.params, m.apply_fn, prompts, method, num_layers=c.num_layers,
        kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=m.dtype,
        chunk_size=FLAGS.chunk_size, quantize_each_chunk=FLAGS.quantize_each_chunk)
  else:
    cache = m.new_cache(len(prompts), tokens.shape[1])
    peak_cache = cache.nbytes
    observe = None if method is None else method.observe
    _, cache, obs = gen.prefill(m.params, jnp.asarray(tokens), jnp.asarray(lengths),
                                cache, apply_fn=m.apply_fn, chunk_size=FLAGS.chunk_size,
                                observe=observe)
    final = cache if method is None else methods.compress(method, cache, obs)
  jax.block_until_ready(final)
  row.update(peak_cache_bytes=peak_cache, final_cache_bytes=final.nbytes)


if __name__ == "__main__":
  app.run(main)
