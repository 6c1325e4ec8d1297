r"""Trains MatryoshkaKV projections for a model: PCA start, Matryoshka distillation, evaluation.

  python -m experiments.train_matryoshka --model=smollm2-135m --steps=300 \
      --out=results/matryoshka/smollm2-135m            # rerun the same command after a kill

Writes, under ``--out`` (default ``runs/matryoshka/<model>``; the committed ``results/`` only
when ``--out`` names them):
* ``run.json``  the run's identity: the model (name, source, fingerprint) and every setting that
  shapes the training. A rerun resumes only under the same identity; any changed setting is
  refused, listed (``--overwrite`` discards the old run and starts over);
* ``pca/``      the PCA projections (orbax; ``methods.make("matryoshka_pca")`` reads them);
* ``train/``    the resumable training state (orbax ``CheckpointManager``, every
  ``--save_every`` steps) and ``metrics.jsonl`` (one row per step);
* ``trained/``  the trained projections (``methods.make("matryoshka")``) and the ranks of the
  greedy per-head search (``--search_budget``; ``matryoshka:searched=true``);
* ``summary.json`` the distillation loss / KL / CE at ``--eval_rank`` on held-out windows for
  the PCA start and the trained projections, and the settings.

Calibration and training text is the second half of the offline stdlib docs; held-out windows
come from the first half (where the perplexity task draws). ``--mesh=data:8`` splits the batch
over devices (the same launcher runs on a TPU pod with the coordinator flags).
"""

import json
import os
import shutil
import time

from absl import app, flags, logging
import jax
import numpy as np
from kvlab.lib.progress import tqdm

from kvlab import models
from kvlab.lib import distributed, flag_checks, outputs, sharding
from kvlab.lib.data.text import stdlib_docs, text_of_tokens
from kvlab.lib.lowrank import matryoshka as mk
from kvlab.lib.lowrank import matryoshka_search as ms
from kvlab.lib.lowrank import matryoshka_train as mt
from kvlab.models import registry
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
distributed.define_flags()
flags.DEFINE_string("model", "smollm2-135m", "Named model, HF checkpoint dir or .gguf file.")
flags.DEFINE_string("out", "", "Output directory (default: runs/matryoshka/<model>).")
flags.DEFINE_bool("overwrite", False, "Discard a run under --out made for another model or with "
                  "other settings, and start over.")
flags.DEFINE_integer("num_calib", 16, "PCA calibration windows.")
flags.DEFINE_integer("calib_seqlen", 512, "Tokens per PCA window.")
flags.DEFINE_integer("pool_tokens", 65536, "Training text tokens (windows drawn at random).")
flags.DEFINE_integer("steps", 300, "Training steps.")
flags.DEFINE_integer("batch", 2, "Windows per step (split over the mesh's data axis).")
flags.DEFINE_integer("seqlen", 256, "Tokens per training window.")
flags.DEFINE_float("lr", 1e-3, "Peak learning rate (reference: 1e-3 for the projections).")
flags.DEFINE_integer("warmup", 10, "Linear warm-up steps before the cosine decay.")
flags.DEFINE_float("kl_weight", 0.25, "Loss = w * KL(teacher || student) + (1 - w) * CE.")
flags.DEFINE_integer("rank_step", 8, "Ranks are sampled from {s, 2s, ..., head_dim}.")
flags.DEFINE_integer("seed", 0, "Seed of window and rank sampling.")
flags.DEFINE_integer("save_every", 25, "Checkpoint interval (steps).")
flags.DEFINE_integer("log_every", 10, "Print loss / KL / CE to the console every N steps (the "
                     "metrics file has every step); 0 = never.")
flags.DEFINE_integer("eval_windows", 8, "Held-out windows for the PCA-vs-trained comparison.")
flags.DEFINE_float("eval_rank", 0.5, "Rank (fraction of the head dim) of that comparison.")
flags.DEFINE_float("search_budget", 0.5, "Greedy per-head rank search for this mean fraction "
                   "of the head dim, stored with the trained projections (0: no search).")
flags.DEFINE_integer("search_step", 16, "Rank grid step of the search (reference: H / 4).")
flags.DEFINE_bool("search_per_layer", True, "One rank per layer (the cache stores each layer at "
                  "its largest head rank, so per-head ranks save no bytes within a layer).")
flags.DEFINE_integer("search_windows", 2, "Calibration windows of the search.")
flags.DEFINE_integer("search_seqlen", 128, "Tokens per search window.")


# Every flag that shapes the PCA start or the training (not: checkpoint interval, mesh, the
# search and the evaluation, which every run redoes from the trained state).
_SETTINGS = ("num_calib", "calib_seqlen", "pool_tokens", "steps", "batch", "seqlen", "lr",
             "warmup", "kl_weight", "rank_step", "seed")
_RUN_FILES = ("run.json", "pca", "train", "trained", "summary.json", "search_errors.npy")

flag_checks.at_least("num_calib", 1)
flag_checks.at_least("calib_seqlen", 8)
flag_checks.at_least("pool_tokens", 1)
flag_checks.at_least("steps", 1)
flag_checks.at_least("batch", 1)
flag_checks.at_least("seqlen", 8)
flag_checks.at_least("warmup", 0)
flag_checks.at_least("rank_step", 1)
flag_checks.at_least("seed", 0)
flag_checks.at_least("save_every", 1)
flag_checks.at_least("log_every", 0)
flag_checks.at_least("eval_windows", 1)
flag_checks.at_least("search_step", 1)
flag_checks.at_least("search_windows", 1)
flag_checks.at_least("search_seqlen", 8)
flags.register_validator("lr", lambda v: v > 0, "must be > 0")
flag_checks.in_range("kl_weight", 0.0, 1.0)
flags.register_validator("eval_rank", lambda v: 0 < v <= 1, "must be in (0, 1]")
flag_checks.in_range("search_budget", 0.0, 1.0)


def start_run(out: str, ident: dict) -> None:
  """Records ``ident`` in ``out/run.json``; raises a usage error when ``out`` holds a run of
  another identity (or none recorded) unless ``--overwrite``, which removes that run first."""
  run_file = os.path.join(out, "run.json")
  if not outputs.is_empty(out):
    try:
      outputs.check_replace(out, outputs.read_json(run_file), ident, what="MatryoshkaKV run",
                            overwrite=FLAGS.overwrite, resume=True)
    except ValueError as e:
      raise app.UsageError(f"--out: {e}") from e
    old = outputs.read_json(run_file)
    if FLAGS.overwrite and (old is None or outputs.changes(old, ident)) and not jax.process_index():
      for name in _RUN_FILES:
        p = os.path.join(out, name)
        if os.path.isdir(p):
          shutil.rmtree(p)
        elif os.path.exists(p):
          os.remove(p)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("train_matryoshka: old run removed")
  if not jax.process_index():
    os.makedirs(out, exist_ok=True)
    with open(run_file, "w") as f:
      json.dump(ident, f, indent=1)


def main(argv):
  del argv
  launch_config.apply()
  distributed.initialize_from_flags()
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
  out = os.path.abspath(FLAGS.out or outputs.default_out("matryoshka",
                                                         registry.slug(FLAGS.model)))
  lm = models.load(FLAGS.model, progress=True)
  try:
    cfg = mt.TrainConfig(steps=FLAGS.steps, batch=FLAGS.batch, seqlen=FLAGS.seqlen, lr=FLAGS.lr,
                         warmup=FLAGS.warmup, kl_weight=FLAGS.kl_weight,
                         rank_step=FLAGS.rank_step, seed=FLAGS.seed,
                         save_every=FLAGS.save_every)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  for n, what in ((FLAGS.seqlen, "--seqlen"), (FLAGS.calib_seqlen, "--calib_seqlen")):
    if n > lm.config.max_position_embeddings:
      raise app.UsageError(f"{what}={n} exceeds the model's context of "
                           f"{lm.config.max_position_embeddings} tokens")
  if lm.config.head_dim % FLAGS.rank_step:
    raise app.UsageError(f"--rank_step={FLAGS.rank_step} must divide the head dim "
                         f"{lm.config.head_dim}")
  if FLAGS.pool_tokens <= FLAGS.seqlen:
    raise app.UsageError(f"--pool_tokens={FLAGS.pool_tokens} must exceed --seqlen="
                         f"{FLAGS.seqlen}")
  fp = lm.fingerprint  # before the params are spread over a mesh
  lm, mesh = sharding.place_model(lm, FLAGS.mesh)
  if mesh is None and len(jax.devices()) > 1:
    mesh = sharding.make_mesh("")
  if mesh is not None and cfg.batch % mesh.shape["data"]:
    raise app.UsageError(f"--batch={cfg.batch} does not split over the mesh's data axis "
                         f"({mesh.shape['data']}): use a multiple of it")
  # checked and recorded once the flags are known to be usable (a refused start leaves none)
  start_run(out, outputs.identity(FLAGS.model, lm.source, fp,
                                  **{k: FLAGS[k].value for k in _SETTINGS}))
  text = stdlib_docs()
  pca_dir = os.path.join(out, "pca")
  t0 = time.time()
  if os.path.isdir(pca_dir):  # a resumed run keeps the start it trained from
    pca = mk.load(pca_dir)
    pca.check_model(fp, lm.config.num_layers, lm.config.num_kv_heads, lm.config.head_dim)
  else:
    ids = text_of_tokens(lm.tokenizer, FLAGS.num_calib * FLAGS.calib_seqlen,
                         offset_chars=len(text) // 2)
    samples = [ids[i * FLAGS.calib_seqlen:(i + 1) * FLAGS.calib_seqlen]
               for i in range(FLAGS.num_calib)]
    pca = mk.pca(mk.kv_moments(lm, samples, progress=True), FLAGS.model, fp, lm.source)
    mk.save(pca, pca_dir)
  pca_seconds = round(time.time() - t0, 1)

  pool = np.asarray(text_of_tokens(lm.tokenizer, FLAGS.pool_tokens, offset_chars=len(text) // 2),
                    np.int32)
  t0 = time.time()
  def log(row):
    if FLAGS.log_every and (row["step"] % FLAGS.log_every == 0 or row["step"] == cfg.steps):
      tqdm.write(f"step {row['step']}/{cfg.steps}: loss {row['loss']:.4f} KL {row['kl']:.4f} "
                 f"CE {row['ce']:.4f} ({row['seconds']:.2f} s)")

  theta, run = mt.train(lm, pca, pool, cfg, os.path.join(out, "train"), mesh=mesh,
                        progress=True, log=log)
  train_seconds = round(time.time() - t0, 1)
  trained = mt.to_projections(pca, theta, {"steps": cfg.steps, "train": cfg.__dict__})
  search_seconds = None
  if FLAGS.search_budget:
    t0 = time.time()
    windows = mt.windows_of(pool, FLAGS.search_windows, FLAGS.search_seqlen)
    err = ms.sensitivities(lm, trained, windows, FLAGS.search_step, progress=True)
    trained.ranks = ms.greedy_ranks(err, FLAGS.search_step, lm.config.head_dim,
                                    FLAGS.search_budget, per_layer=FLAGS.search_per_layer)
    trained.meta["search_budget"] = FLAGS.search_budget
    trained.meta["search_per_layer"] = FLAGS.search_per_layer
    np.save(os.path.join(out, "search_errors.npy"), err)  # [2, L, K, grid]: re-search offline
    search_seconds = round(time.time() - t0, 1)
  mk.save(trained, os.path.join(out, "trained"))

  held = mt.windows_of(text_of_tokens(lm.tokenizer, FLAGS.eval_windows * FLAGS.seqlen),
                       FLAGS.eval_windows, FLAGS.seqlen)
  rank = mk.as_ranks(FLAGS.eval_rank, lm.config.head_dim)
  before = mt.evaluate(lm, pca, mt.init_theta(pca), held, rank, cfg.kl_weight)
  after = mt.evaluate(lm, pca, theta, held, rank, cfg.kl_weight)
  full = mt.evaluate(lm, pca, mt.init_theta(pca), held, lm.config.head_dim, cfg.kl_weight)
  evals = {"pca": before, "trained": after, "full_rank": full}
  if trained.ranks is not None:
    evals["trained_searched"] = mt.evaluate(lm, pca, theta, held, trained.ranks, cfg.kl_weight)
    evals["trained_searched"]["ranks_keys_mean_per_layer"] = trained.ranks[0].mean(1).tolist()
    evals["trained_searched"]["ranks_values_mean_per_layer"] = trained.ranks[1].mean(1).tolist()
  summary_path = os.path.join(out, "summary.json")
  before_runs = []  # a resumed run keeps the earlier runs' timings
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      old = json.load(f)
    before_runs = old.get("runs", []) or [{"steps": old.get("steps_this_run"),
                                           "train_seconds": old.get("train_seconds_this_run")}]
  summary = {"model": FLAGS.model, "source": lm.source, "model_fingerprint": fp,
             "train": cfg.__dict__,
             "runs": before_runs + [{"steps": len(run), "train_seconds": train_seconds}],
             "pca_seconds": pca_seconds, "train_seconds_this_run": train_seconds,
             "steps_this_run": len(run), "search_seconds": search_seconds, "eval": evals,
             "eval_text": "stdlib docs, first half (held out)", "devices": jax.device_count(),
             "platform": jax.devices()[0].platform}
  print(json.dumps(summary["eval"], indent=1))
  if jax.process_index() == 0:
    with open(summary_path, "w") as f:
      json.dump(summary, f, indent=1)


if __name__ == "__main__":
  app.run(main)
