r"""Evaluate compression methods against the full cache on offline RULER-style tasks.

  python -m experiments.evaluate --method=snapkv,streaming_llm --ratio=0.25,0.5,0.75 \
      --task=niah_single --lengths=1024 --num_samples=20 --out=results/eval.jsonl

Every sample is prefilled once; the full cache answers first (the reference), then each
method x ratio compresses a copy and answers. One JSONL row per sample x cell, with the config and
git revision; a killed run resumes where it stopped (finished rows are skipped). A leaderboard is
printed at the end (``experiments.report`` writes markdown and plots from the same file).

--haystack and --needle take lists (e.g. --haystack=docs,code,license,changelog --needle=pin,uuid):
each haystack x needle format is its own run identity in the same file, and the report adds a
table by haystack and one averaged over haystacks.
"""

import contextlib
import os
import sys
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
from kvlab.lib.progress import tqdm

from kvlab import models
from kvlab.lib import distributed, flag_checks, jsonl, sharding
from kvlab.lib import methods
from kvlab.lib.eval import aggregate, identity
from kvlab.lib.eval.runner import PROTOCOLS, prefill_modes, run_perplexity, run_sample
from kvlab.lib.data import haystacks
from kvlab.lib.eval.tasks import (DEFAULT_NEEDLE, HAYSTACKS, NEEDLES, TASKS, make_sample,
                                  perplexity_tokens, uses_haystack, uses_needle)
from kvlab.lib.online import split_online
from kvlab.lib.online_quantized import check_quantizable_each_chunk
from kvlab.lib.provenance import git_rev
from kvlab.lib.quant.kvquant_calibrate import model_fingerprint
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
distributed.define_flags()
flags.DEFINE_string("model", "smollm2-135m", "Named model, HF checkpoint dir or .gguf file.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and cache dtype.")
flags.DEFINE_list("method", ["snapkv", "streaming_llm", "knorm", "tova"],
                  "Method specs (registry names; 'a+b' composes).")
flags.DEFINE_list("ratio", ["0.25", "0.5", "0.75"], "Fractions of the cache kept.")
flags.DEFINE_list("task", ["niah_single"], f"Tasks: {', '.join(TASKS)}.")
flags.DEFINE_list("lengths", ["1024"], "Context lengths in tokens.")
flags.DEFINE_integer("num_samples", 20, "Samples per (task, length).")
flags.DEFINE_enum("protocol", "query_agnostic", PROTOCOLS, "When the question is seen.")
flags.DEFINE_list("haystack", ["noise"], "Needle-task filler texts, each run in turn: "
                  f"{', '.join(HAYSTACKS)} (lib.data.haystacks).")
flags.DEFINE_list("needle", [DEFAULT_NEEDLE], "Needle formats of the niah tasks, each run in "
                  f"turn: {', '.join(NEEDLES)} (lib.eval.tasks).")
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
flags.DEFINE_bool("append_run", False,
                  "--out holds rows of another run (model, dtype, commit or a flag that shapes "
                  "a row differs): add this run's rows beside them instead of refusing.")

flag_checks.float_list("ratio", low=0.0, high=1.0, low_open=True)
flag_checks.choice_list("task", TASKS)
flag_checks.choice_list("haystack", HAYSTACKS, unavailable=haystacks.unavailable)
flag_checks.choice_list("needle", NEEDLES)
flag_checks.int_list("lengths", minimum=1)
flag_checks.float_list("depths", low=0.0, high=1.0, example="0,0.5,1", allow_empty=True,
                       unique=False)
flag_checks.at_least("num_samples", 1)
flag_checks.at_least("seed", 0)
flag_checks.at_least("max_new_tokens", 1, why="the answer needs a token")
flag_checks.at_least("continuation", 2, why="perplexity scores next tokens of the continuation")
flag_checks.at_least("chunk_size", 8)
flag_checks.at_least("batch_cells", 1)
flag_checks.define_method_module()
flag_checks.method_specs("method", "ratio")

# 64 tokens for the question and chat template around a context.
_QUESTION_ROOM = 64


def _check_fits_model(lm) -> None:
  """Lengths and answer length against the model's context, before anything runs."""
  limit = lm.config.max_position_embeddings
  if FLAGS.max_new_tokens >= limit - _QUESTION_ROOM:
    raise app.UsageError(f"--max_new_tokens={FLAGS.max_new_tokens} leaves no room for a "
                         f"context in the model's {limit} tokens: use --max_new_tokens<="
                         f"{limit // 4}")
  room = limit - _QUESTION_ROOM - FLAGS.max_new_tokens
  for n in (int(x) for x in FLAGS.lengths):
    if "perplexity" in FLAGS.task and n + FLAGS.continuation > limit:
      raise app.UsageError(f"--lengths={n} with --continuation={FLAGS.continuation} does not "
                           f"fit the model's context of {limit} tokens: use --lengths<="
                           f"{limit - FLAGS.continuation}")
    if n > room:
      raise app.UsageError(f"--lengths={n} does not fit the model's context of {limit} tokens "
                           f"with the question and --max_new_tokens={FLAGS.max_new_tokens}: "
                           f"use --lengths<={room}")


def _settings(task: str) -> list[tuple[str, str]]:
  """The (haystack, needle format) pairs ``task`` runs on: every pair for the niah tasks; the
  haystacks with the default needle for variable tracking; the first haystack for the tasks
  that use neither."""
  hs = FLAGS.haystack if uses_haystack(task) else FLAGS.haystack[:1]
  ns = FLAGS.needle if uses_needle(task) else [DEFAULT_NEEDLE]
  return [(h, nd) for h in hs for nd in ns]


def _check_samples(lm, count) -> None:
  """Builds each (task, length)'s first sample: a length too short for its needles, or a
  perplexity text shorter than asked, fails here rather than after a model's worth of work."""
  for task in FLAGS.task:
    for n in (int(x) for x in FLAGS.lengths):
      try:
        if task == "perplexity":
          prefix, cont = perplexity_tokens(lm.tokenizer, n, FLAGS.seed, FLAGS.continuation)
          if len(prefix) != n or len(cont) != FLAGS.continuation:
            raise ValueError(f"the offline text yields {len(prefix)} + {len(cont)} tokens, "
                             f"not {n} + {FLAGS.continuation}")
        else:
          for h, nd in _settings(task):
            try:
              make_sample(task, n, FLAGS.seed, count, haystack=h, needle=nd,
                          depth=float(FLAGS.depths[0]) if FLAGS.depths else None)
            except ValueError as e:
              raise ValueError(f"--haystack={h} --needle={nd}: {e}") from e
      except ValueError as e:
        raise app.UsageError(f"--task={task} --lengths={n}: {e}") from e


def _identities(lm) -> dict:
  """``{(haystack, needle): identity}``: everything that shapes a row besides its cell and
  sample (``lib.eval.identity``), for each haystack x needle format the run covers; the needle
  enters only when not the default (``identity.needle_field``)."""
  fingerprint, git = model_fingerprint(lm.config, lm.params), git_rev()
  pairs = {p for t in FLAGS.task for p in _settings(t)}
  return {(h, nd): identity.identity(
      model=FLAGS.model, model_fingerprint=fingerprint,
      dtype=FLAGS.dtype, git=git, protocol=FLAGS.protocol, haystack=h,
      depths=[float(d) for d in FLAGS.depths], max_new_tokens=FLAGS.max_new_tokens,
      continuation=FLAGS.continuation, chunk_size=FLAGS.chunk_size,
      attn_block_size=lm.attn_block_size, batch_cells=FLAGS.batch_cells,
      **identity.needle_field(nd)) for h, nd in sorted(pairs)}


def main(argv):
  del argv
  launch_config.apply()
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
  try:  # a torn or foreign file is refused before the model loads
    old_rows = jsonl.read(FLAGS.out) if os.path.exists(FLAGS.out) else []
  except ValueError as e:
    raise app.UsageError(f"--out: {e}") from e
  print(f"loading {FLAGS.model} ...", file=sys.stderr, flush=True)
  dtype = jnp.float32 if FLAGS.dtype == "float32" else jnp.bfloat16
  lm = models.load(FLAGS.model, dtype=dtype, progress=True)
  lm, _ = sharding.place_model(lm, FLAGS.mesh)
  what = f"{FLAGS.model} ({lm.source})"
  for spec, _, m in cells:
    try:
      methods.check_for_model(m, lm.config, lm.params, what)
    except (ValueError, FileNotFoundError) as e:
      raise app.UsageError(f"--method={spec}: {e}") from e
  _check_fits_model(lm)
  count = lambda s: len(lm.tokenizer.encode(s, add_special_tokens=False))
  _check_samples(lm, count)
  idents = _identities(lm)  # one run identity per haystack x needle
  try:
    same = identity.check_resume(old_rows, list(idents.values()), FLAGS.out,
                                 append_run=FLAGS.append_run)
  except identity.MixedRunsError as e:
    raise app.UsageError(str(e)) from e
  done = {(r["run"],) + aggregate.row_key(r) for r in same}  # keys within each run identity
  config = {k: FLAGS[k].value for k in ("model", "method", "ratio", "task", "lengths",
                                        "num_samples", "protocol", "haystack", "seed", "depths",
                                        "max_new_tokens", "compress_during_prefill", "batch_cells",
                                        "chunk_size", "quantize_each_chunk", "dtype")}
  jobs = [(t, h, nd, n, FLAGS.seed + i) for t in FLAGS.task for h, nd in _settings(t)
          for n in lengths for i in range(FLAGS.num_samples)]
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  # multi-host: every process computes, process 0 writes (under an exclusive lock: a second
  # writer to the same file is refused instead of duplicating rows)
  writer = (jsonl.appender(FLAGS.out, fix="wait for it to finish, or pass another --out")
            if jax.process_index() == 0
            else contextlib.nullcontext(None))
  try:
    f = writer.__enter__()
  except jsonl.LockedError as e:
    raise app.UsageError(f"--out: {e}") from e
  try:
    bar = tqdm(jobs, desc="samples", unit="sample", position=0)
    steps = tqdm(desc="  this sample", unit="step", position=1, leave=False)  # cells done, ETA
    for task, hay, needle, n, seed in bar:
      ident = idents[(hay, needle)]
      rid = identity.run_id(ident)
      protocol = "prefix" if task == "perplexity" else FLAGS.protocol
      want = [(s, r, m) for s, r, _ in cells for m in modes] + [("full", 1.0, "after")]
      if all((rid, task, n, protocol, seed) + w in done for w in want):
        continue
      bar.set_postfix_str(f"{task} {n} tok, {hay} haystack, {needle} needle, sample {seed}")
      todo = [c for c in cells
              if any((rid, task, n, protocol, seed, c[0], c[1], m) not in done for m in modes)]
      if task == "perplexity":
        prefix, cont = perplexity_tokens(lm.tokenizer, n, seed, FLAGS.continuation)
        rows = run_perplexity(lm, prefix, cont, todo, seed=seed, chunk_size=FLAGS.chunk_size,
                              progress=steps)
      else:
        depth = float(FLAGS.depths[seed % len(FLAGS.depths)]) if FLAGS.depths else None
        sample = make_sample(task, n, seed, count, haystack=hay, depth=depth, needle=needle)
        rows = run_sample(lm, sample, todo, protocol=FLAGS.protocol,
                          max_new_tokens=FLAGS.max_new_tokens, chunk_size=FLAGS.chunk_size,
                          during_prefill=FLAGS.compress_during_prefill,
                          batch_cells=FLAGS.batch_cells,
                          quantize_each_chunk=FLAGS.quantize_each_chunk, progress=steps)
      for r in rows:
        r.update({"length": n})
        if (rid,) + aggregate.row_key(r) in done:
          continue
        r.update({"git": ident["git"], "time": time.time(), "run": rid, "identity": ident,
                  "config": {**config, "haystack": hay, "needle": needle}})
        if f is not None:
          f.write(r)
        done.add((rid,) + aggregate.row_key(r))
    steps.close()
  finally:
    writer.__exit__(None, None, None)
  table = aggregate.cells(aggregate.unique_rows(aggregate.read_rows([FLAGS.out]))[0])
  for c in table:
    key = "ppl" if c["task"] == "perplexity" else "score"
    s = c[key]
    print(f"{c['task']:<16} {c['length']:>6} {c['method']:<32} {c['ratio']:<5} "
          f"{key} {s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] n={s['n']} "
          f"KL {c['kl']['mean']:.3f} top1 {c['top1']['mean']:.3f} bytes {c['bytes_ratio']:.2f}")


if __name__ == "__main__":
  app.run(main)
