r"""Calibrate ``kvzip_heads``: one KVzip score per (layer, kv head), from real text.

  python -m experiments.calibrate_kvzip_heads --model=smollm2-135m --length=2048 --samples=4 \
      --out=results/kvzip_heads/smollm2-135m.json

Each sample is a stretch of the stdlib docs (not an evaluation task: the table must not know
the needles), put in the chat template as the user's message, prefilled; KVzip's repeats
(``lib.protocol.reconstruction_scores``) score every cached pair, and a head's score is the
largest over its context slots (sinks and the template's prefix left out). The table is the
mean over samples. Writes JSON with the scores ``[L][K]``, the model's fingerprint and the
per-sample tables; ~1-2 prefills per sample.

Without ``--out`` it writes ``runs/kvzip_heads/<model>.json`` (the committed
``results/kvzip_heads/`` only when ``--out`` names it). An existing table of another model or
other settings is not replaced unless ``--overwrite`` is given.
"""

import json
import os
import random
import time

from absl import app, flags
import jax
import numpy as np
from kvlab.lib.progress import tqdm

from kvlab import models
from kvlab.lib import flag_checks, outputs
from kvlab.lib.data.text import stdlib_docs, text_of_tokens
from kvlab.lib.eval.runner import prompt_pieces, reconstruction_prompts
from kvlab.lib.eval.tasks import Sample
from kvlab.lib.methods.kvzip_heads import table_from_scores
from kvlab.lib.protocol import prefill_context, reconstruction_scores
from kvlab.lib.provenance import git_rev
from kvlab.models import registry
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
flags.DEFINE_string("model", "smollm2-135m", "Named model, HF checkpoint dir or .gguf file.")
flags.DEFINE_integer("length", 2048, "Context tokens per calibration sample.")
flags.DEFINE_integer("samples", 4, "Calibration samples (stretches of the stdlib docs).")
flags.DEFINE_integer("chunk", 2048, "KVzip repeat chunk (tokens).")
flags.DEFINE_integer("sinks", 4, "Leading slots left out of each head's max.")
flags.DEFINE_integer("seed", 0, "Where in the docs the samples start.")
flags.DEFINE_string("out", "", "Table (JSON; default: runs/kvzip_heads/<model>.json).")
flags.DEFINE_bool("overwrite", False, "Replace an --out table made for another model or with "
                  "other settings.")

_SETTINGS = ("length", "samples", "chunk", "sinks", "seed")

flag_checks.at_least("length", 8)
flag_checks.at_least("samples", 1)
flag_checks.at_least("chunk", 8)
flag_checks.at_least("sinks", 0)
flag_checks.at_least("seed", 0)


def stored_identity(path: str) -> dict | None:
  """The identity of the head table at ``path`` (None: not a table)."""
  t = outputs.read_json(path)
  if t is None or "scores" not in t:
    return None
  return outputs.identity(t.get("model", ""), t.get("source", ""), t.get("fingerprint"),
                          **{k: t.get(k) for k in _SETTINGS})


def main(argv):
  del argv
  launch_config.apply()
  if FLAGS.samples < 1 or FLAGS.length < 64:
    raise app.UsageError("--samples must be >= 1 and --length >= 64 tokens")
  path = FLAGS.out or outputs.default_out("kvzip_heads", registry.slug(FLAGS.model) + ".json")
  lm = models.load(FLAGS.model, progress=False)
  c = lm.config
  settings = {k: FLAGS[k].value for k in _SETTINGS}
  ident = outputs.identity(FLAGS.model, lm.source, lm.fingerprint, **settings)
  if not outputs.is_empty(path):
    try:
      outputs.check_replace(path, stored_identity(path), ident, what="kvzip_heads table",
                            overwrite=FLAGS.overwrite)
    except ValueError as e:
      raise app.UsageError(f"--out: {e}") from e
  room = c.max_position_embeddings - FLAGS.length
  if room < min(FLAGS.chunk, FLAGS.length) + 64:
    raise app.UsageError(f"--length={FLAGS.length} leaves no room for the repeats in the "
                         f"model's {c.max_position_embeddings} positions: lower --length")
  rng = random.Random(f"kvzip_heads:{FLAGS.seed}")
  docs = len(stdlib_docs())
  tables, t0 = [], time.time()
  for _ in tqdm(range(FLAGS.samples), desc="calibration samples"):
    ids = text_of_tokens(lm.tokenizer, FLAGS.length, offset_chars=rng.randrange(0, docs // 2))
    text = lm.tokenizer.decode(ids)
    ctx, _ = prompt_pieces(lm.tokenizer, Sample("calibration", text, "", []), "query_agnostic")
    ctx = ctx[:FLAGS.length]
    cache, _, _ = prefill_context(lm.params, lm.apply_fn, [ctx], num_layers=c.num_layers,
                                  kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                  block=lm.attn_block_size)
    prompts, prefix = reconstruction_prompts(lm.tokenizer, ctx)
    out = reconstruction_scores(lm.params, lm.apply_fn, cache, ctx, prompts, chunk=FLAGS.chunk,
                                prefix=prefix, max_context=c.max_position_embeddings,
                                block=lm.attn_block_size)
    scores = np.asarray(jax.device_get(out["scores"]))
    tables.append(table_from_scores(scores, len(ctx), max(FLAGS.sinks, prefix)))
  table = np.mean(tables, 0)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  result = {"model": FLAGS.model, "source": lm.source, "fingerprint": lm.fingerprint,
            "scores": table.round(6).tolist(), "per_sample": [t.round(6).tolist() for t in tables],
            **settings,
            "pooling": "max over context slots, mean over samples", "text": "stdlib docs",
            "seconds": round(time.time() - t0, 1), "git": git_rev(),
            "command": "python -m experiments.calibrate_kvzip_heads " + " ".join(
                f"--{k}={FLAGS[k].value}" for k in ("model", *_SETTINGS)) + f" --out={path}"}
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  order = np.argsort(-table.reshape(-1))
  print(f"wrote {path}: {table.shape[0]} layers x {table.shape[1]} kv heads; best heads "
        f"(layer, head): {[divmod(int(i), table.shape[1]) for i in order[:8]]}")


if __name__ == "__main__":
  app.run(main)
