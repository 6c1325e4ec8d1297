r"""Compresses a model's KV heads (Yu et al. 2024) and compares perplexity with the original.

  python -m experiments.compress_kv_heads --model=smollm2-135m --kv_heads=1 --num_samples=8 \
      --seqlen=512 --eval_samples=4 --eval_tokens=512 --out=results/kv_heads_smollm2.json

Calibration caches come from the second half of the offline stdlib docs (as KVQuant's
calibration); perplexity is the perplexity task of ``experiments.evaluate`` (a continuation
scored after a prefix, from the first half), for the original and the converted model. No LoRA
recovery fine-tuning. ``--save_dir`` also writes the converted model as an HF checkpoint
directory that ``--model=DIR`` loads.

Without ``--out`` the result goes to ``runs/kv_heads/<model>_kv<N>.json`` (the committed
``results/`` only when ``--out`` names it). A result or ``--save_dir`` made from another model
or with other settings is not replaced unless ``--overwrite`` is given.
"""

import dataclasses
import json
import os
import time

from absl import app, flags
import numpy as np
from kvlab.lib.progress import tqdm

from kvlab import models
from kvlab.lib import flag_checks, outputs
from kvlab.lib.data.text import stdlib_docs, text_of_tokens
from kvlab.lib.eval.runner import run_perplexity
from kvlab.lib.eval.tasks import perplexity_tokens
from kvlab.lib.lowrank import kv_heads as kvh
from kvlab.lib.provenance import write_result
from kvlab.models import hf_export, registry
from kvlab.models.decoder import make_apply_fn
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
flags.DEFINE_string("model", "smollm2-135m", "Named model, HF checkpoint dir or .gguf file.")
flags.DEFINE_integer("kv_heads", 1, "KV heads after the conversion (divides the model's).")
flags.DEFINE_integer("num_samples", 8, "Calibration samples.")
flags.DEFINE_integer("seqlen", 512, "Tokens per calibration sample.")
flags.DEFINE_integer("eval_samples", 4, "Perplexity samples (seeds 0..n-1).")
flags.DEFINE_integer("eval_tokens", 512, "Prefix tokens of each perplexity sample.")
flags.DEFINE_integer("continuation", 256, "Tokens scored after the prefix.")
flags.DEFINE_string("out", "", "Result JSON (default: runs/kv_heads/<model>_kv<N>.json).")
flags.DEFINE_string("save_dir", "", "If set, the converted checkpoint is written here.")
flags.DEFINE_bool("overwrite", False, "Replace an --out or --save_dir made from another model "
                  "or with other settings.")

_CONVERSION = ("kv_heads", "num_samples", "seqlen")  # what shapes the converted weights
_SETTINGS = _CONVERSION + ("eval_samples", "eval_tokens", "continuation")
IDENTITY_FILE = "kvlab_conversion.json"  # in --save_dir: what made the checkpoint

flag_checks.at_least("kv_heads", 1)
flag_checks.at_least("num_samples", 1)
flag_checks.at_least("seqlen", 8)
flag_checks.at_least("eval_samples", 0)
flag_checks.at_least("eval_tokens", 8)
flag_checks.at_least("continuation", 2)


def _check_outputs(lm, out: str) -> tuple[dict, dict]:
  """The identities of the result and of the converted checkpoint; raises a usage error when
  ``out`` or ``--save_dir`` holds one made otherwise."""
  ident = outputs.identity(FLAGS.model, lm.source, lm.fingerprint,
                           **{k: FLAGS[k].value for k in _SETTINGS})
  conv = outputs.identity(FLAGS.model, lm.source, lm.fingerprint,
                          **{k: FLAGS[k].value for k in _CONVERSION})
  checks = [("--out", out, "kv_heads result", lambda p: (outputs.read_json(p) or {}).get("run"),
             ident)]
  if FLAGS.save_dir:
    checks.append(("--save_dir", FLAGS.save_dir, "converted checkpoint",
                   lambda p: outputs.read_json(os.path.join(p, IDENTITY_FILE)), conv))
  for flag, path, what, read, new in checks:
    if not outputs.is_empty(path):
      try:
        outputs.check_replace(path, read(path), new, what=what, overwrite=FLAGS.overwrite,
                              flag=flag)
      except ValueError as e:
        raise app.UsageError(f"{flag}: {e}") from e
  return ident, conv


def calibration_samples(tokenizer, num_samples: int, seqlen: int) -> list[list[int]]:
  """``num_samples`` consecutive ``seqlen``-token windows from the second half of the docs."""
  ids = text_of_tokens(tokenizer, num_samples * seqlen, offset_chars=len(stdlib_docs()) // 2)
  return [ids[i * seqlen:(i + 1) * seqlen] for i in range(num_samples)]


def perplexity(lm, samples) -> dict:
  """Perplexity over ``samples`` [(prefix, continuation)] and the measured cache bytes."""
  rows = [run_perplexity(lm, p, c, [], seed=i)[0]
          for i, (p, c) in enumerate(tqdm(samples, desc="perplexity", leave=False))]
  nll = [float(np.log(r["ppl"])) for r in rows]
  return {"ppl": float(np.exp(np.mean(nll))), "ppl_per_sample": [r["ppl"] for r in rows],
          "cache_bytes": rows[0]["cache_bytes"]}


def main(argv):
  del argv
  launch_config.apply()
  out = FLAGS.out or outputs.default_out(
      "kv_heads", f"{registry.slug(FLAGS.model)}_kv{FLAGS.kv_heads}.json")
  lm = models.load(FLAGS.model, progress=True)
  c = lm.config
  ident, conv_ident = _check_outputs(lm, out)
  try:
    kvh.check_kv_heads(c, FLAGS.kv_heads)
  except ValueError as e:
    raise app.UsageError(f"--kv_heads={FLAGS.kv_heads}: {e}") from e
  if FLAGS.seqlen > c.max_position_embeddings:
    raise app.UsageError(f"--seqlen={FLAGS.seqlen} exceeds the model's context of "
                         f"{c.max_position_embeddings} tokens")
  t0 = time.time()
  keys, values = kvh.collect_kv(lm, calibration_samples(lm.tokenizer, FLAGS.num_samples,
                                                        FLAGS.seqlen))
  t1 = time.time()
  cfg, params = kvh.compress_kv_heads(c, lm.params, keys, values, FLAGS.kv_heads)
  del keys, values
  t2 = time.time()
  conv = dataclasses.replace(lm, config=cfg, params=params,
                             apply_fn=make_apply_fn(cfg, lm.dtype, lm.attn_block_size))
  evals = [perplexity_tokens(lm.tokenizer, FLAGS.eval_tokens, s, FLAGS.continuation)
           for s in range(FLAGS.eval_samples)]
  orig, new = perplexity(lm, evals), perplexity(conv, evals)
  result = {
      "model": FLAGS.model, "source": lm.source, "fingerprint": lm.fingerprint, "run": ident,
      "kv_heads_before": c.num_kv_heads, "kv_heads_after": cfg.num_kv_heads,
      "num_heads": c.num_heads, "head_dim": c.head_dim, "num_layers": c.num_layers,
      "calibration": {"num_samples": FLAGS.num_samples, "seqlen": FLAGS.seqlen,
                      "text": "stdlib docs, second half"},
      "eval": {"samples": FLAGS.eval_samples, "prefix_tokens": FLAGS.eval_tokens,
               "continuation_tokens": FLAGS.continuation, "text": "stdlib docs, first half"},
      "original": {**orig, "kv_bytes_per_token": kvh.kv_bytes_per_token(c, lm.dtype)},
      "converted": {**new, "kv_bytes_per_token": kvh.kv_bytes_per_token(cfg, lm.dtype)},
      "dtype": str(np.dtype(lm.dtype)), "collect_s": round(t1 - t0, 1),
      "convert_s": round(t2 - t1, 1), "lora_recovery": False,
  }
  if FLAGS.save_dir:
    result["saved_to"] = hf_export.save_converted(conv, FLAGS.save_dir)
    with open(os.path.join(FLAGS.save_dir, IDENTITY_FILE), "w") as f:
      json.dump(conv_ident, f, indent=1)
  write_result(out, result)
  print(f"{FLAGS.model}: kv heads {c.num_kv_heads} -> {cfg.num_kv_heads}; perplexity "
        f"{orig['ppl']:.3f} -> {new['ppl']:.3f}; K/V bytes per token "
        f"{result['original']['kv_bytes_per_token']} -> "
        f"{result['converted']['kv_bytes_per_token']}")


if __name__ == "__main__":
  app.run(main)
