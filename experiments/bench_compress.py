r"""Compression overhead: (observe during prefill + compress) as a fraction of prefill time.

  python -m experiments.bench_compress --length=4096 --out=results/bench_compress_cpu.json

For each method: prefill without any hook (baseline), prefill with the method's observe hook,
and compress, each the best of ``--reps`` after a compile run, on real stdlib-docs text.
"""

import json
import os
import platform
import time

from absl import app, flags
import jax
import jax.numpy as jnp

import models
from lib import generate as gen
from lib import methods
from lib.data.text import text_of_tokens
from lib.provenance import git_rev

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model.")
flags.DEFINE_integer("length", 4096, "Prompt tokens.")
flags.DEFINE_float("ratio", 0.5, "Fraction kept.")
flags.DEFINE_list("method", sorted(methods.REGISTRY), "Methods.")
flags.DEFINE_integer("reps", 2, "Timed repetitions (best reported).")
flags.DEFINE_string("out", "results/bench_compress_cpu.json", "JSON output.")


def _prefill(lm, tokens, lengths, observe):
  cache = lm.new_cache(1, tokens.shape[1])
  t = time.perf_counter()
  _, cache, obs = gen.prefill(lm.params, tokens, lengths, cache, apply_fn=lm.apply_fn,
                              chunk_size=512, observe=observe)
  jax.block_until_ready((cache, obs))
  return time.perf_counter() - t, cache, obs


def _best(f, reps):
  f()  # compile
  return min(f() for _ in range(reps))


def main(argv):
  del argv
  lm = models.load(FLAGS.model, progress=False)
  ids = text_of_tokens(lm.tokenizer, FLAGS.length)
  tokens, lengths = gen.pad_batch([ids], 512)
  tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
  base = _best(lambda: _prefill(lm, tokens, lengths, None)[0], FLAGS.reps)
  rows = []
  for name in FLAGS.method:
    m = methods.make(name, ratio=FLAGS.ratio)
    pre = base if m.observe is None else _best(
        lambda: _prefill(lm, tokens, lengths, m.observe)[0], FLAGS.reps)
    _, cache, obs = _prefill(lm, tokens, lengths, m.observe)

    def comp():
      t = time.perf_counter()
      jax.block_until_ready(methods.compress(m, cache, obs))
      return time.perf_counter() - t

    c = _best(comp, FLAGS.reps)
    row = {"method": name, "prefill_s": pre, "observe_s": max(pre - base, 0.0),
           "compress_s": c, "overhead_fraction": (max(pre - base, 0.0) + c) / base}
    rows.append(row)
    print(json.dumps(row))
  res = {"benchmark": "bench_compress", "prompt_tokens": len(ids), "ratio": FLAGS.ratio,
         "baseline_prefill_s": base, "rows": rows, "git": git_rev(),
         "device": f"cpu: {platform.machine()}, {os.cpu_count()} cores",
         "jax": jax.__version__, "reps": FLAGS.reps,
         "command": f"python -m experiments.bench_compress --length={FLAGS.length}"}
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(res, f, indent=1)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
