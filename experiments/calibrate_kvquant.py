r"""Calibrates KVQuant for a model: Fisher information, key ranges, per-layer datatypes, Q-Norm.

  python -m experiments.calibrate_kvquant --model=smollm2-135m --num_samples=16 --seqlen=2048 \
      --bits=2,3,4 --out=results/calibration/kvquant_smollm2-135m

Calibration text is real prose from the second half of the offline stdlib documentation
(``lib.data.text``); the perplexity task draws from the first half, so the two do not overlap.
The result is an orbax checkpoint directory (arrays + JSON metadata with the model's
fingerprint) that ``methods.make("kvquant", calibration=...)`` reads. A killed run restarts
from scratch (a calibration takes minutes; the Fisher pass dominates).

Without ``--out`` it writes ``runs/calibration/kvquant_<model>`` (the committed
``results/calibration/...`` only when ``--out`` names it). An existing calibration of another
model or other settings is not replaced unless ``--overwrite`` is given.
"""

import json
import os
import time

from absl import app, flags, logging
import jax

from kvlab import models
from kvlab.lib import distributed, flag_checks, outputs, saved_arrays, sharding
from kvlab.lib.data.text import stdlib_docs, text_of_tokens
from kvlab.lib.quant import kvquant_calibrate as calib
from kvlab.models import registry
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
distributed.define_flags()
flags.DEFINE_string("model", "smollm2-135m", "Named model, HF checkpoint dir or .gguf file.")
flags.DEFINE_integer("num_samples", 16, "Calibration samples (KVQuant: 16).")
flags.DEFINE_integer("seqlen", 2048, "Tokens per sample (KVQuant: 2048).")
flags.DEFINE_list("bits", ["2", "3", "4"], "Datatype widths to fit.")
flags.DEFINE_list("qnorm_bits", ["2"], "Widths whose LUT gets Q-Norm.")
flags.DEFINE_float("outlier_fraction", 0.01, "Fraction of values kept sparse (KVQuant: 1 %).")
flags.DEFINE_integer("kmeans_iters", 50, "Lloyd iterations (sklearn max_iter in KVQuant).")
flags.DEFINE_integer("max_points", 1 << 20, "k-means points per layer (uniform subsample).")
flags.DEFINE_string("out", "", "Output directory (default: runs/calibration/kvquant_<model>).")
flags.DEFINE_bool("overwrite", False, "Replace an --out calibrated for another model or with "
                  "other settings.")

# identity setting (flag name) -> its key in the calibration's meta
_SETTINGS = {"bits": "bits", "qnorm_bits": "qnorm_bits", "outlier_fraction": "outlier_fraction",
             "num_samples": "n_samples", "seqlen": "seqlen", "kmeans_iters": "kmeans_iters",
             "max_points": "max_points"}

flag_checks.at_least("num_samples", 1)
flag_checks.at_least("seqlen", 8)
flag_checks.at_least("kmeans_iters", 1)
flag_checks.at_least("max_points", 1)
flags.register_validator("outlier_fraction", lambda v: 0 <= v < 0.5, "must be in [0, 0.5)")
flag_checks.int_list("bits", minimum=1)


def calibration_samples(tokenizer, num_samples: int, seqlen: int) -> list[list[int]]:
  """``num_samples`` consecutive ``seqlen``-token windows from the second half of the docs."""
  text = stdlib_docs()
  ids = text_of_tokens(tokenizer, num_samples * seqlen, offset_chars=len(text) // 2)
  return [ids[i * seqlen:(i + 1) * seqlen] for i in range(num_samples)]


def stored_identity(path: str) -> dict | None:
  """The identity of the calibration at ``path`` (None: not a calibration)."""
  meta = saved_arrays.read_meta(path)
  if not meta or meta.get("format") != calib.FORMAT:
    return None
  return outputs.identity(meta.get("model", ""), meta.get("source", ""), meta.get("fingerprint"),
                          **{k: meta.get(m) for k, m in _SETTINGS.items()})


def main(argv):
  del argv
  launch_config.apply()
  distributed.initialize_from_flags()
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
  bits = [int(b) for b in FLAGS.bits]
  out = FLAGS.out or outputs.default_out("calibration", "kvquant_" + registry.slug(FLAGS.model))
  lm = models.load(FLAGS.model, progress=True)
  ident = outputs.identity(FLAGS.model, lm.source, lm.fingerprint, bits=bits,
                           qnorm_bits=[int(b) for b in FLAGS.qnorm_bits],
                           outlier_fraction=FLAGS.outlier_fraction, num_samples=FLAGS.num_samples,
                           seqlen=FLAGS.seqlen, kmeans_iters=FLAGS.kmeans_iters,
                           max_points=FLAGS.max_points)
  if not outputs.is_empty(out):
    try:
      outputs.check_replace(out, stored_identity(out), ident, what="KVQuant calibration",
                            overwrite=FLAGS.overwrite)
    except ValueError as e:
      raise app.UsageError(f"--out: {e}") from e
  lm, _ = sharding.place_model(lm, FLAGS.mesh)
  if FLAGS.seqlen > lm.config.max_position_embeddings:
    raise app.UsageError(f"--seqlen={FLAGS.seqlen} exceeds the model's context of "
                         f"{lm.config.max_position_embeddings} tokens")
  t0 = time.time()
  samples = calibration_samples(lm.tokenizer, FLAGS.num_samples, FLAGS.seqlen)
  cal = calib.calibrate(lm, samples, bits=bits, qnorm_bits=[int(b) for b in FLAGS.qnorm_bits],
                        outlier_fraction=FLAGS.outlier_fraction, iters=FLAGS.kmeans_iters,
                        max_points=FLAGS.max_points, model_name=FLAGS.model)
  cal.meta["seconds"] = round(time.time() - t0, 1)
  path = calib.save(cal, out)  # orbax: every process takes part in the write
  print(f"wrote {path} in {cal.meta['seconds']} s")
  for b in bits:
    print(f"{b}-bit key LUT of layer 0: {cal.lut('k', b)[0].round(3).tolist()}")
  if jax.process_index():
    return
  with open(os.path.join(path, "summary.json"), "w") as f:
    json.dump({**cal.meta, "luts_layer0": {k: v[0].tolist() for k, v in cal.luts.items()}},
              f, indent=1)


if __name__ == "__main__":
  app.run(main)
