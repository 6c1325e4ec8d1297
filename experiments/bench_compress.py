r"""Compression overhead: (observe during prefill + compress) as a fraction of prefill time.

  python -m experiments.bench_compress --length=4096 --out=results/bench_compress_cpu.json

For each method: prefill without any hook (baseline) and prefill with the method's observe hook,
alternating rep by rep, then compress; each the best of ``--reps`` after a compile run, on real
stdlib-docs text. Quantizers (kivi) run at ratio 1.0 (they keep every token). Methods whose
budgets differ by layer or head (pyramidkv, adakv) also give ``compress_unpaged_s`` (compress
without paging the result) and, for AdaKV, ``budgets_s`` (its budget allocation alone).
"""

import json
import os
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from kvlab import models
from kvlab.models import decoder
from kvlab.lib import distributed, flag_checks, sharding
from kvlab.lib import generate as gen
from kvlab.lib import methods
from kvlab.lib.methods import accumulated
from kvlab.lib.methods import base as base_lib
from kvlab.lib.data.text import text_of_tokens
from kvlab.lib.eval.runner import method_observations
from kvlab.lib.methods.kvzip import reconstructor
from kvlab.lib.provenance import device_description, git_rev, write_result
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
distributed.define_flags()
flags.DEFINE_string("model", "smollm2-135m", "Model.")
flags.DEFINE_integer("chunk", 512, "Prefill chunk (tokens per step of the chunked prefill).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and cache dtype.")
flags.DEFINE_integer("length", 4096, "Prompt tokens.")
flags.DEFINE_float("ratio", 0.5, "Fraction kept.")
flags.DEFINE_list("method", sorted(methods.REGISTRY), "Methods.")
flags.DEFINE_integer("reps", 3, "Timed repetitions (best reported).")
flags.DEFINE_bool("attention_probs", True,
                  "H2O/TOVA/Keyformer take the attention's own probabilities from its pass "
                  "(False: the hooks' own second pass, the previous behaviour, to compare).")
flags.DEFINE_enum("column_sums", "auto", ["auto", "kept", "own", "kernel"],
                  "How H2O/TOVA/Keyformer form their column sums "
                  "(lib.methods.accumulated.COLUMN_SUMS): auto (the default: the fused kernel "
                  "for the plain sums on one GPU, kept probabilities elsewhere and for "
                  "Keyformer), kept attention probabilities, the hook's own pass, or the fused "
                  "Pallas kernels (GPU).")
flags.DEFINE_string("out", "results/bench_compress_cpu.json", "JSON output.")

flag_checks.at_least("chunk", 8)
flag_checks.at_least("length", 1)
flag_checks.at_least("reps", 1)
flags.register_validator("ratio", lambda v: 0 < v <= 1, "must be in (0, 1]")


def _prefill(lm, tokens, lengths, observe):
  cache = lm.new_cache(1, tokens.shape[1])
  t = time.perf_counter()
  _, cache, obs = gen.prefill(lm.params, tokens, lengths, cache, apply_fn=lm.apply_fn,
                              chunk_size=FLAGS.chunk, observe=observe)
  jax.block_until_ready((cache, obs))
  return time.perf_counter() - t, cache, obs


def _timed(f):
  """Seconds ``f()`` takes to a ready result."""
  t = time.perf_counter()
  jax.block_until_ready(f())
  return time.perf_counter() - t


def _best(f, reps):
  f()  # compile
  return min(f() for _ in range(reps))


def main(argv):
  del argv
  launch_config.apply()
  distributed.initialize_from_flags()
  if not FLAGS.attention_probs:
    decoder.PROBS_MAX_BYTES = 0
  accumulated.COLUMN_SUMS = FLAGS.column_sums
  lm = models.load(FLAGS.model, dtype=getattr(jnp, FLAGS.dtype), progress=False)
  lm, _ = sharding.place_model(lm, FLAGS.mesh)
  ids = text_of_tokens(lm.tokenizer, FLAGS.length)
  tokens, lengths = gen.pad_batch([ids], FLAGS.chunk)
  tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
  _prefill(lm, tokens, lengths, None)  # compile the hook-free prefill
  rows, bases = [], []
  for name in FLAGS.method:
    m = methods.make(name, ratio=1.0 if getattr(methods.REGISTRY.get(name), "quantizes", False)
                     else FLAGS.ratio)
    _, cache, obs = _prefill(lm, tokens, lengths, m.observe)  # compile (and observations)
    # Baseline and hooked prefill alternate rep by rep, so machine noise hits both.
    base_t, pre_t = [], []
    for _ in range(FLAGS.reps):
      base_t.append(_prefill(lm, tokens, lengths, None)[0])
      pre_t.append(base_t[-1] if m.observe is None else _prefill(lm, tokens, lengths,
                                                                  m.observe)[0])
    base, pre = min(base_t), min(pre_t)
    bases.append(base)

    if reconstructor(m) is not None:  # KVzip: its repeat passes are part of compressing
      c = _best(lambda: _timed(lambda: methods.compress(
          m, cache, method_observations(lm, m, cache, ids, chunk_size=FLAGS.chunk)[0])),
                FLAGS.reps)
    else:
      c = _best(lambda: _timed(lambda: methods.compress(m, cache, obs)), FLAGS.reps)
    observe_s = max(pre - base, 0.0)
    row = {"method": name, "baseline_prefill_s": base, "prefill_s": pre, "observe_s": observe_s,
           "compress_s": c, "overhead_fraction": (observe_s + c) / base,
           "load_avg": os.getloadavg()[0],
           "column_sums": getattr(m.observe, "impl", None),
           # the same from each rep's pair (hooked minus the hook-free run just before it):
           # less sensitive to a lucky best-of than the difference of two minima
           "observe_paired_median_s": float(np.median(np.subtract(pre_t, base_t)))}
    if getattr(m, "layout", None) == "paged":  # where compress spends it: paging the result
      row["compress_unpaged_s"] = _best(lambda: _timed(lambda: methods.compress(
          m, cache, obs, final=False)), FLAGS.reps)
    if hasattr(m, "budgets"):  # ... and AdaKV's data-dependent budgets alone
      kept = jnp.asarray(m.kept(sharding.to_host(cache.lengths)), jnp.int32)
      row["budgets_s"] = _best(lambda: _timed(lambda: base_lib._budgets(m, cache, obs, kept)),
                               FLAGS.reps)
    rows.append(row)
    print(json.dumps(row))
  base = float(np.median(bases))
  res = {"benchmark": "bench_compress", "prompt_tokens": len(ids), "ratio": FLAGS.ratio,
         "baseline_prefill_s": base, "rows": rows, "git": git_rev(),
         "device": device_description(), "dtype": FLAGS.dtype, "model": FLAGS.model,
         "chunk": FLAGS.chunk,
         "jax": jax.__version__, "reps": FLAGS.reps,
         "attention_probs": FLAGS.attention_probs, "column_sums": FLAGS.column_sums,
         "command": " ".join(["python -m experiments.bench_compress"] + sys.argv[1:])}
  write_result(FLAGS.out, res)


if __name__ == "__main__":
  app.run(main)
