"""Calibration launchers write under ``runs/<model>`` by default (never into the committed
``results/``), refuse an output made for another model or with other settings, and a
MatryoshkaKV run resumes only under the settings it started with."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok_tiny(tmp_path_factory):
  """``make(seed) -> path``: a tiny random Llama with SmolLM2's tokenizer (launchers read
  text), one per seed."""
  from kvlab.models import registry, tokenizer as tok_mod  # pylint: disable=g-import-not-at-top
  from kvlab.models.gguf_loader import open_gguf  # pylint: disable=g-import-not-at-top
  tok = tok_mod.from_gguf(open_gguf(registry.resolve("smollm2-135m")[1]))
  built = {}

  def make(seed: int) -> str:
    if seed not in built:
      d = tmp_path_factory.mktemp(f"tok_tiny{seed}") / f"tiny-{seed}"
      cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32,
                                     intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=512, tie_word_embeddings=True)
      torch.manual_seed(seed)
      transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
      tok._tok.save(str(d / "tokenizer.json"))  # pylint: disable=protected-access
      json.dump({"bos_token": tok.bos_token, "eos_token": tok.eos_token,
                 "chat_template": tok.chat_template}, open(d / "tokenizer_config.json", "w"))
      built[seed] = str(d)
    return built[seed]

  return make


def _launch(module: str, cwd, *args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=str(cwd), env=env,
                        capture_output=True, text=True, timeout=600)


KVQUANT = ("--num_samples=1", "--seqlen=32", "--bits=2", "--qnorm_bits=2", "--kmeans_iters=2",
           "--max_points=2000")


@pytest.fixture(scope="module")
def kvquant_run(tok_tiny, tmp_path_factory):
  """One calibration of tiny-0 with the default --out, run in a fresh directory: ``(cwd,
  out)``; the committed calibration's metadata must not change."""
  committed = os.path.join(ROOT, "results", "calibration", "kvquant_smollm2-135m", "meta",
                           "metadata")
  before = os.stat(committed).st_mtime_ns
  cwd = tmp_path_factory.mktemp("kvquant_run")
  p = _launch("experiments.calibrate_kvquant", cwd, f"--model={tok_tiny(0)}", *KVQUANT)
  assert p.returncode == 0, p.stderr[-3000:]
  assert os.stat(committed).st_mtime_ns == before
  return cwd, cwd / "runs" / "calibration" / "kvquant_tiny-0"


def test_calibrate_kvquant_default_out_is_under_runs_named_after_the_model(tok_tiny, kvquant_run):
  from kvlab.lib.quant import kvquant_calibrate as calib  # pylint: disable=g-import-not-at-top
  cwd, out = kvquant_run
  model = tok_tiny(0)
  assert not (cwd / "results").exists()  # the old default: results/calibration/...smollm2
  cal = calib.load(str(out))
  assert cal.meta["model"] == model and cal.meta["source"] == model
  assert cal.meta["fingerprint"].startswith("w1-")


def test_calibrate_kvquant_refuses_an_output_of_another_model_or_settings(tok_tiny, kvquant_run,
                                                                          tmp_path):
  _, cal_dir = kvquant_run
  out = str(cal_dir)
  a, b = tok_tiny(0), tok_tiny(1)
  meta = os.path.join(out, "meta", "metadata")
  written = os.stat(meta).st_mtime_ns
  p = _launch("experiments.calibrate_kvquant", tmp_path, f"--model={b}", f"--out={out}", *KVQUANT)
  assert p.returncode != 0, "a calibration of another model was overwritten"
  assert "made for another model" in p.stderr and a in p.stderr and b in p.stderr
  assert "--overwrite" in p.stderr and "another --out" in p.stderr
  p = _launch("experiments.calibrate_kvquant", tmp_path, f"--model={a}", f"--out={out}",
              *KVQUANT, "--kmeans_iters=3")
  assert p.returncode != 0 and "--kmeans_iters: 2 -> 3" in p.stderr, p.stderr[-3000:]
  assert os.stat(meta).st_mtime_ns == written
  # a foreign directory is not a calibration: refused too
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "notes.txt").write_text("mine")
  p = _launch("experiments.calibrate_kvquant", tmp_path, f"--model={a}",
              f"--out={tmp_path / 'junk'}", *KVQUANT)
  assert p.returncode != 0 and "does not record what made it" in p.stderr
  assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"
  # --overwrite forces it
  p = _launch("experiments.calibrate_kvquant", tmp_path, f"--model={b}", f"--out={out}",
              *KVQUANT, "--overwrite")
  assert p.returncode == 0, p.stderr[-3000:]


MATRYOSHKA = ("--num_calib=1", "--calib_seqlen=32", "--pool_tokens=300", "--batch=1",
              "--seqlen=32", "--warmup=1", "--rank_step=4", "--search_budget=0",
              "--eval_windows=1", "--save_every=1")


def test_train_matryoshka_refuses_to_resume_with_changed_settings(tok_tiny, tmp_path):
  model = tok_tiny(0)
  p = _launch("experiments.train_matryoshka", tmp_path, f"--model={model}", "--steps=2",
              *MATRYOSHKA)
  assert p.returncode == 0, p.stderr[-3000:]
  p = _launch("experiments.train_matryoshka", tmp_path, f"--model={model}", *MATRYOSHKA,
              "--steps=3", "--lr=0.002")  # both changes named in one refusal
  assert p.returncode != 0, "resumed under --steps=3 --lr=0.002"
  assert "made with other settings" in p.stderr, p.stderr[-3000:]
  assert "--lr: 0.001 -> 0.002" in p.stderr and "--steps: 2 -> 3" in p.stderr, p.stderr[-3000:]
  assert "same flags" in p.stderr and "another --out" in p.stderr
  out = tmp_path / "runs" / "matryoshka" / "tiny-0"  # the default --out, named after the model
  assert json.load(open(out / "run.json"))["settings"]["lr"] == 0.001
  assert json.load(open(out / "summary.json"))["train"]["steps"] == 2
  assert not (tmp_path / "results").exists()
  # the same flags resume (nothing left to train) and --overwrite starts over
  p = _launch("experiments.train_matryoshka", tmp_path, f"--model={model}", "--steps=2",
              *MATRYOSHKA)
  assert p.returncode == 0, p.stderr[-3000:]
  p = _launch("experiments.train_matryoshka", tmp_path, f"--model={model}", "--steps=3",
              *MATRYOSHKA, "--overwrite")
  assert p.returncode == 0, p.stderr[-3000:]
  assert [json.loads(r)["step"] for r in open(out / "train" / "metrics.jsonl")] == [1, 2, 3]


def test_training_shorter_than_its_warmup_runs(tmp_path, tiny_dir):
  """``--steps`` <= ``--warmup`` used to crash in optax (cosine decay over 0 steps)."""
  from kvlab import models  # pylint: disable=g-import-not-at-top
  from kvlab.lib.lowrank import matryoshka as mk  # pylint: disable=g-import-not-at-top
  from kvlab.lib.lowrank import matryoshka_train as mt  # pylint: disable=g-import-not-at-top
  lm = models.load(tiny_dir("llama")[0], progress=False, attn_block_size=8)
  pca = mk.pca(mk.kv_moments(lm, [list(range(3, 35))]))
  pool = np.random.RandomState(0).randint(0, 160, 200).astype(np.int32)
  for steps in (1, 3):
    cfg = mt.TrainConfig(steps=steps, batch=1, seqlen=16, warmup=10, rank_step=4)
    _, run = mt.train(lm, pca, pool, cfg, str(tmp_path / f"s{steps}"))
    assert len(run) == steps and all(np.isfinite(r["loss"]) for r in run)


def test_model_slugs():
  from kvlab.models import registry  # pylint: disable=g-import-not-at-top
  assert registry.slug("smollm2-135m") == "smollm2-135m"
  assert registry.slug("/ckpt/Qwen3-0.6B/") == "Qwen3-0.6B"
  assert registry.slug("x/SmolLM2.Q4_1.gguf") == "SmolLM2.Q4_1"
  assert registry.slug("/d/my model") == "my_model"
