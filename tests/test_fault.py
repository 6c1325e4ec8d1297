"""Fault injection: ``evaluate`` and ``train_matryoshka`` killed (SIGKILL) at random points, then
resumed, lose no row or step, duplicate none, leave no torn line, and end with the same numbers
as an uninterrupted run.

Each kill waits until the run has written a random number of rows (or training steps), then a
random few milliseconds more, so kills land mid-run (between rows, inside a sample's cells, in a
checkpoint save) rather than during start-up. Each case then also tears the last line by hand (a
crash in the middle of a write, which a SIGKILL between writes rarely produces). Bounded: at most
``_KILLS`` kills per seed and a time limit on every process.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_KILLS = 2
_LIMIT_S = 240


def _lines(path):
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    return f.read().count(b"\n")


def _run_killed(cmd, watch, rng, kills=_KILLS):
  """Starts ``cmd`` up to ``kills`` times, each time SIGKILLing it once ``watch`` has grown by a
  random 1-3 lines (plus 0-200 ms); returns how many kills landed before a run finished."""
  landed = 0
  for _ in range(kills):
    before = _lines(watch)
    want = before + rng.randint(1, 3)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while proc.poll() is None and _lines(watch) < want and time.time() - t0 < _LIMIT_S:
      time.sleep(0.01)
    if proc.poll() is not None:  # finished (or failed) before the kill point
      err = proc.stderr.read().decode()
      assert proc.returncode == 0, err[-3000:]
      return landed
    time.sleep(rng.uniform(0, 0.2))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    landed += 1
  return landed


def _finish(cmd):
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=_LIMIT_S)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _rows(path):
  with open(path) as f:
    text = f.read()
  assert text.endswith("\n"), "the file ends in a torn line"
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def _eval_cmd(model, out):
  return [sys.executable, "-m", "experiments.evaluate", f"--model={model}", "--lengths=200",
          "--num_samples=3", "--method=knorm,snapkv", "--ratio=0.5", "--max_new_tokens=4",
          "--batch_cells=1", f"--out={out}"]


_MEASURED = ("score", "kl", "top1", "prediction", "cache_bytes", "full_bytes")


@pytest.fixture(scope="module")
def eval_reference(chat_tiny, tmp_path_factory):
  out = tmp_path_factory.mktemp("ref") / "rows.jsonl"
  _finish(_eval_cmd(chat_tiny, out))
  return {(r["sample"], r["method"]): r for r in _rows(out)}


def test_evaluate_killed_and_resumed_keeps_every_row_once(chat_tiny, eval_reference, tmp_path):
  rng = random.Random(1)
  out = str(tmp_path / "rows.jsonl")
  cmd = _eval_cmd(chat_tiny, out)
  landed = _run_killed(cmd, out, rng)
  if os.path.exists(out):  # then a crash in the middle of a write: half a row, no newline
    with open(out, "a") as f:
      f.write('{"task": "niah_single", "length": 200, "sam')
  _finish(cmd)
  rows = _rows(out)
  keys = [(r["sample"], r["method"]) for r in rows]
  assert len(keys) == len(set(keys)), f"duplicated rows after {landed} kills"
  assert set(keys) == set(eval_reference), f"rows lost after {landed} kills"
  assert len({r["run"] for r in rows}) == 1
  for r in rows:
    ref = eval_reference[(r["sample"], r["method"])]
    for k in _MEASURED:
      want, got = ref[k], r[k]
      if isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-5), (k, r["sample"], r["method"])
      else:
        assert got == want, (k, r["sample"], r["method"])


def _train_cmd(model, out, steps=8):
  return [sys.executable, "-m", "experiments.train_matryoshka", f"--model={model}",
          f"--out={out}", f"--steps={steps}", "--save_every=2", "--num_calib=2",
          "--calib_seqlen=64", "--pool_tokens=2048", "--seqlen=64", "--eval_windows=2",
          "--search_budget=0", "--warmup=2"]


@pytest.fixture(scope="module")
def train_reference(chat_tiny, tmp_path_factory):
  out = tmp_path_factory.mktemp("train_ref")
  _finish(_train_cmd(chat_tiny, out))
  return _rows(os.path.join(out, "train", "metrics.jsonl"))


def test_train_matryoshka_killed_and_resumed_keeps_every_step_once(chat_tiny, train_reference,
                                                                   tmp_path):
  rng = random.Random(101)
  out = str(tmp_path / "run")
  metrics = os.path.join(out, "train", "metrics.jsonl")
  cmd = _train_cmd(chat_tiny, out)
  landed = _run_killed(cmd, metrics, rng)
  if os.path.exists(metrics):  # then a torn last line
    with open(metrics, "a") as f:
      f.write('{"step": 99, "lo')
  _finish(cmd)
  rows = _rows(metrics)
  steps = [r["step"] for r in rows]
  assert steps == list(range(1, 9)), f"steps {steps} after {landed} kills"
  for r, ref in zip(rows, train_reference):  # resumed from a checkpoint: the same trajectory
    assert r["loss"] == pytest.approx(ref["loss"], rel=1e-4), (r["step"], landed)
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["train"]["steps"] == 8
  assert os.path.isdir(os.path.join(out, "trained"))
