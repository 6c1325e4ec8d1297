r"""Evaluate compression methods against the full cache on offline RULER-style tasks.

  python -m experiments.evaluate --method=snapkv,streaming_llm --ratio=0.25,0.5,0.75 \
      --task=niah_single --lengths=1024 --num_samples=20 --out=results/eval.jsonl

Every sample is prefilled once; the full cache answers first (the reference), then each
method x ratio compresses a copy and answers. One JSONL row per sample x cell, with the config and
git revision; a killed run resumes where it stopped (finished rows are skipped). A leaderboard is
printed at the end (``experiments.report`` writes markdown and plots from the same file).
"""

import json
import os
import time

from absl import app, flags, logging
import jax
from tqdm.auto import tqdm

import models
from lib import distributed, sharding
from lib import methods
from lib.eval import aggregate
from lib.eval.runner import PROTOCOLS, prefill_modes, run_perplexity, run_sample
from lib.eval.tasks import TASKS, make_sample, perplexity_tokens
from lib.online import split_online
from lib.online_quantized import check_quantizable_each_chunk
from lib.provenance import git_rev

FLAGS = flags.FLAGS
distributed.define_flags()
flags.DEFINE_string("model", "smollm2-135m", "Named model, HF checkpoint dir or .gguf file.")
flags.DEFINE_list("method", ["snapkv", "streaming_llm", "knorm", "tova"],
                  "Method specs (registry names; 'a+b' composes).")
flags.DEFINE_list("ratio", ["0.25", "0.5", "0.75"], "Fractions of the cache kept.")
flags.DEFINE_list("task", ["niah_single"], f"Tasks: {', '.join(TASKS)}.")
flags.DEFINE_list("lengths", ["1024"], "Context lengths in tokens.")
flags.DEFINE_integer("num_samples", 20, "Samples per (task, length).")
flags.DEFINE_enum("protocol", "query_agnostic", PROTOCOLS, "When the question is seen.")
flags.DEFINE_enum("haystack", "noise", ["noise", "docs"], "Needle-task filler text.")
flags.DEFINE_integer("seed", 0, "First sample seed.")
flags.DEFINE_list("depths", [], "Needle depths (0 = start, 1 = end) cycled over samples, for a "
                  "depth x length grid; empty = random depth per sample.")
flags.DEFINE_integer("max_new_tokens", 48, "Answer length limit.")
flags.DEFINE_integer("continuation", 256, "Perplexity task: continuation tokens scored.")
flags.DEFINE_bool("compress_during_prefill", False,
                  "Also evaluate every cell compressing after each prefill chunk (the cache never "
                  "holds more than budget + one chunk), next to compress-after-prefill.")
flags.DEFINE_bool("quantize_each_chunk", False,
                  "With --compress_during_prefill and evict+kivi methods: also evaluate every "
                  "cell quantizing what is kept after each chunk (the float cache never holds "
                  "more than KIVI's window + one chunk), next to quantizing once at the end.")
flags.DEFINE_integer("chunk_size", 512, "Prefill chunk (the online mode's extra slots).")
flags.DEFINE_integer("batch_cells", 8,
                     "Cells (method x ratio) whose compressed caches are answered together as "
                     "one batch (plain-cache methods only; 1 = every cell alone).")
flags.DEFINE_string("out", "results/eval.jsonl", "Per-sample rows (appended; resumable).")


def main(argv):
  del argv
  distributed.initialize_from_flags()
  logging.set_verbosity(logging.WARNING)  # orbax (KVQuant calibrations) logs every read
  ratios = [float(r) for r in FLAGS.ratio]
  cells = [(spec, r, methods.make(spec, ratio=r)) for spec in FLAGS.method for r in ratios]
  lengths = [int(x) for x in FLAGS.lengths]
  try:
    modes = prefill_modes(FLAGS.compress_during_prefill, FLAGS.quantize_each_chunk)
  except ValueError as e:
    raise app.UsageError(f"--quantize_each_chunk: {e}") from e
  if FLAGS.compress_during_prefill:
    if "perplexity" in FLAGS.task:
      raise app.UsageError("--compress_during_prefill covers the question tasks; run the "
                           "perplexity task without it")
    for spec, _, m in cells:
      try:
        evict, quantizers = split_online(m)
        if FLAGS.quantize_each_chunk:
          check_quantizable_each_chunk(evict, quantizers)
      except ValueError as e:
        raise app.UsageError(f"--method={spec}: {e}") from e
  lm = models.load(FLAGS.model, progress=False)
  lm, _ = sharding.place_model(lm, FLAGS.mesh)
  for spec, _, m in cells:
    try:
      methods.check_for_model(m, lm.config, lm.params, FLAGS.model)
    except (ValueError, FileNotFoundError) as e:
      raise app.UsageError(f"--method={spec}: {e}") from e
  for n in lengths:  # 64 tokens for the question and chat template, then the answer
    room = lm.config.max_position_embeddings - 64 - FLAGS.max_new_tokens
    if n > room:
      raise app.UsageError(f"--lengths={n} does not fit the model's context of "
                           f"{lm.config.max_position_embeddings} tokens with the question and "
                           f"--max_new_tokens={FLAGS.max_new_tokens}: use --lengths<={room}")
  count = lambda s: len(lm.tokenizer.encode(s, add_special_tokens=False))
  done = aggregate.done_keys(FLAGS.out, FLAGS.haystack)
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  config = {k: FLAGS[k].value for k in ("model", "method", "ratio", "task", "lengths",
                                        "num_samples", "protocol", "haystack", "seed", "depths",
                                        "max_new_tokens", "compress_during_prefill", "batch_cells",
                                        "chunk_size", "quantize_each_chunk")}
  rev = git_rev()
  jobs = [(t, n, FLAGS.seed + i) for t in FLAGS.task for n in lengths
          for i in range(FLAGS.num_samples)]
  # multi-host: every process computes, process 0 writes
  with open(FLAGS.out if jax.process_index() == 0 else os.devnull, "a") as f:
    for task, n, seed in tqdm(jobs, desc="samples"):
      protocol = "prefix" if task == "perplexity" else FLAGS.protocol
      want = [(s, r, m) for s, r, _ in cells for m in modes] + [("full", 1.0, "after")]
      if all((task, n, protocol, seed) + w in done for w in want):
        continue
      todo = [c for c in cells
              if any((task, n, protocol, seed, c[0], c[1], m) not in done for m in modes)]
      if task == "perplexity":
        prefix, cont = perplexity_tokens(lm.tokenizer, n, seed, FLAGS.continuation)
        rows = run_perplexity(lm, prefix, cont, todo, seed=seed, chunk_size=FLAGS.chunk_size)
      else:
        depth = float(FLAGS.depths[seed % len(FLAGS.depths)]) if FLAGS.depths else None
        sample = make_sample(task, n, seed, count, haystack=FLAGS.haystack, depth=depth)
        rows = run_sample(lm, sample, todo, protocol=FLAGS.protocol,
                          max_new_tokens=FLAGS.max_new_tokens, chunk_size=FLAGS.chunk_size,
                          during_prefill=FLAGS.compress_during_prefill,
                          batch_cells=FLAGS.batch_cells,
                          quantize_each_chunk=FLAGS.quantize_each_chunk)
      for r in rows:
        if (task, n, protocol, seed, r["method"], r["ratio"],
            r.get("prefill_mode", "after")) in done:
          continue
        r.update({"length": n, "git": rev, "time": time.time(), "config": config})
        f.write(json.dumps(r) + "\n")
      f.flush()
  table = aggregate.cells(aggregate.unique_rows(aggregate.read_rows([FLAGS.out]))[0])
  for c in table:
    key = "ppl" if c["task"] == "perplexity" else "score"
    s = c[key]
    print(f"{c['task']:<16} {c['length']:>6} {c['method']:<32} {c['ratio']:<5} "
          f"{key} {s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] n={s['n']} "
          f"KL {c['kl']['mean']:.3f} top1 {c['top1']['mean']:.3f} bytes {c['bytes_ratio']:.2f}")


if __name__ == "__main__":
  app.run(main)
