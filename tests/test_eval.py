"""Evaluation harness: tasks, metrics, protocols, the resumable launcher and the report."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kvlab.lib.eval import aggregate, report
from kvlab.lib.eval.metrics import fidelity, mean_ci, string_match_all
from kvlab.lib.eval.runner import prompt_pieces
from kvlab.lib.eval.tasks import TASKS, make_sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tasks_are_deterministic_sized_and_hold_their_answers(default_model):
  count = lambda s: len(default_model.tokenizer.encode(s, add_special_tokens=False))
  for task in TASKS:
    if task == "perplexity":
      continue
    a = make_sample(task, 512, 3, count)
    b = make_sample(task, 512, 3, count)
    assert a == b
    assert 400 < count(a.context) <= 512
    if task.startswith("niah") or task == "variable_tracking":
      assert all(ans in a.context for ans in a.answers)
    else:
      freq = collections.Counter(w.rstrip(".") for w in a.context.split() if not w[0].isdigit())
      ranked = freq.most_common()
      assert {w for w, _ in ranked[: len(a.answers)]} == set(a.answers)
      assert ranked[len(a.answers) - 1][1] > ranked[len(a.answers)][1]  # no tie at the cut
  assert make_sample("niah_single", 512, 4, count).context != make_sample(
      "niah_single", 512, 5, count).context
  docs = make_sample("niah_single", 512, 1, count, haystack="docs", depth=0.5)
  assert "The grass is green" not in docs.context and docs.answers[0] in docs.context
  with pytest.raises(ValueError, match="unknown task"):
    make_sample("niah_double", 512, 0, count)


def test_metrics():
  assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == 2 / 3
  s = mean_ci([1, 0, 1, 1] * 25)
  assert s["n"] == 100 and s["mean"] == 0.75 and s["ci95"][0] < 0.75 < s["ci95"][1]
  assert mean_ci([])["n"] == 0
  assert mean_ci([0.0] * 5)["ci95"] == [0.0, 0.0]  # not an outcome: bootstrap
  perfect = mean_ci([1.0] * 40, outcomes=True)  # Wilson: 40/40 is not certainty
  assert perfect["mean"] == 1.0 and 0.9 < perfect["ci95"][0] < 0.92 and perfect["ci95"][1] == 1.0
  cont = mean_ci([0.5, 0.7, 0.6])  # non-binary: bootstrap
  assert 0.5 <= cont["ci95"][0] < 0.6 < cont["ci95"][1] <= 0.7
  rng = np.random.RandomState(0)
  logits = rng.randn(5, 11).astype(np.float32)
  f = fidelity(logits, logits, np.arange(5))
  assert abs(f["kl"]) < 1e-6 and f["top1"] == 1.0 and f["ll"] == f["ll_ref"]
  assert fidelity(logits, rng.randn(5, 11).astype(np.float32), np.arange(5))["kl"] > 0.1


def test_protocols_split_the_prompt(default_model):
  tok = default_model.tokenizer
  s = make_sample("niah_single", 256, 0, lambda x: len(tok.encode(x)))
  ctx_a, q_a = prompt_pieces(tok, s, "query_agnostic")
  ctx_w, q_w = prompt_pieces(tok, s, "query_aware")
  assert s.question in tok.decode(q_a) and s.question not in tok.decode(ctx_a)
  assert s.question in tok.decode(ctx_w) and s.question not in tok.decode(q_w)
  whole = tok.encode_chat(s.context + "\n\n" + s.question)
  assert abs(len(ctx_a + q_a) - len(whole)) <= 2 and abs(len(ctx_w + q_w) - len(whole)) <= 2


def _evaluate(model, out, n):
  cmd = [sys.executable, "-m", "experiments.evaluate", f"--model={model}", "--lengths=200",
         f"--num_samples={n}", "--method=knorm,snapkv", "--ratio=0.5", "--max_new_tokens=6",
         f"--out={out}"]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)


def test_evaluate_launcher_resumes_and_reports(chat_tiny, tmp_path):
  out = tmp_path / "rows.jsonl"
  _evaluate(chat_tiny, out, 2)
  rows = [json.loads(l) for l in open(out)]
  assert len(rows) == 2 * 3  # 2 samples x (full, knorm, snapkv)
  assert {r["method"] for r in rows} == {"full", "knorm", "snapkv"}
  assert all(r["cache_bytes"] < r["full_bytes"] for r in rows if r["method"] != "full")
  assert all(r["git"] and r["config"]["num_samples"] == 2 for r in rows)
  # Kill simulation: drop the last sample's rows, then run again with one more sample.
  open(out, "w").writelines(json.dumps(r) + "\n" for r in rows[:4])
  _evaluate(chat_tiny, out, 3)
  again = [json.loads(l) for l in open(out)]
  assert again[:4] == rows[:4]
  keys = [(r["sample"], r["method"]) for r in again]
  assert len(keys) == len(set(keys)) == 9
  cells = aggregate.cells(again)
  assert {c["method"] for c in cells} == {"full", "knorm", "snapkv"}
  assert all(c["score"]["n"] == 3 for c in cells)
  md = report.leaderboard(cells)
  assert "| knorm | 0.5 |" in md and "| full | 1 |" in md
  png = report.plot_score_vs_ratio(cells, str(tmp_path / "p.png"))
  assert os.path.getsize(png) > 5000
  heat = report.plot_needle_heatmap(again, str(tmp_path / "h.png"))
  assert os.path.getsize(heat) > 5000


def test_shared_context_asks_every_question_of_one_compression(chat_tiny):
  from kvlab import models  # pylint: disable=g-import-not-at-top
  from kvlab.lib import methods  # pylint: disable=g-import-not-at-top
  from kvlab.lib.eval.runner import run_sample  # pylint: disable=g-import-not-at-top

  lm = models.load(chat_tiny, progress=False)
  count = lambda s: len(lm.tokenizer.encode(s, add_special_tokens=False))
  s = make_sample("niah_multikey", 300, 0, count)
  assert len(s.more_queries) == 3 and all(a[0] in s.context for _, a in s.more_queries)
  cells = [("knorm", 0.5, methods.make("knorm", ratio=0.5)),
           ("h2o", 0.5, methods.make("h2o", ratio=0.5))]
  rows = run_sample(lm, s, cells, protocol="shared_context", max_new_tokens=4)
  assert [r["method"] for r in rows] == ["full", "knorm", "h2o"]
  assert all(r["n_questions"] == 4 and r["prediction"].count(" | ") == 3 for r in rows)
  assert rows[0]["kl"] == 0.0 and rows[1]["cache_bytes"] < rows[0]["cache_bytes"]


def test_perplexity_task(chat_tiny, tmp_path):
  out = tmp_path / "ppl.jsonl"
  cmd = [sys.executable, "-m", "experiments.evaluate", f"--model={chat_tiny}", "--lengths=256",
         "--num_samples=2", "--task=perplexity", "--method=knorm,streaming_llm", "--ratio=0.25,1.0",
         "--continuation=64", f"--out={out}"]
  subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
  rows = [json.loads(l) for l in open(out)]
  assert len(rows) == 2 * 5 and all(r["ppl"] > 1 for r in rows)
  by = {(r["sample"], r["method"], r["ratio"]): r for r in rows}
  for s in (0, 1):  # keeping everything reproduces the full cache exactly
    assert abs(by[(s, "knorm", 1.0)]["ppl"] - by[(s, "full", 1.0)]["ppl"]) < 1e-3
    assert by[(s, "knorm", 1.0)]["kl"] < 1e-6 and by[(s, "knorm", 0.25)]["kl"] > 0
  md = report.leaderboard(aggregate.cells(rows))
  assert "perplexity [95% CI]" in md


def test_kvzip_cells_repeat_the_context_after_the_chat_prefix(chat_tiny):
  """The runner forms KVzip's repeat scores for it (alone, as AdaKV's scorer, first in a
  composition): the chat template's system part is found and kept, and each cell keeps its
  ratio of the context."""
  from kvlab import models  # pylint: disable=g-import-not-at-top
  from kvlab.lib import methods  # pylint: disable=g-import-not-at-top
  from kvlab.lib.eval.runner import reconstruction_prompts, run_sample  # pylint: disable=g-import-not-at-top

  lm = models.load(chat_tiny, progress=False)
  count = lambda s: len(lm.tokenizer.encode(s, add_special_tokens=False))
  s = make_sample("niah_single", 300, 0, count)
  ctx, _ = prompt_pieces(lm.tokenizer, s, "query_agnostic")
  (first, later, suffix), prefix = reconstruction_prompts(lm.tokenizer, ctx)
  head = lm.tokenizer.decode(ctx[:prefix])
  assert head.endswith("user\n") and "system" in head and s.context[:20] not in head
  assert "Repeat the previous context" in lm.tokenizer.decode(first)
  assert "assistant" in lm.tokenizer.decode(suffix) and len(later) > len(first)
  specs = ["kvzip", "kvzip:share=layer:chunk=100", "adakv:scorer=kvzip", "kvzip:ratio=0.5+knorm"]
  cells = [(sp, 0.5, methods.make(sp, ratio=0.5)) for sp in specs]
  rows = run_sample(lm, s, cells, protocol="query_agnostic", max_new_tokens=4)
  assert [r["method"] for r in rows] == ["full"] + specs
  full = rows[0]["cache_bytes"]
  assert all(r["cache_bytes"] < 0.6 * full for r in rows[1:])
  assert all(np.isfinite(r["kl"]) for r in rows[1:])
  assert all(r["compress_s"] > 0 for r in rows[1:])  # each cell is charged the repeats


class _Steps:
  """Records what ``run_sample`` reports to a progress bar."""

  def __init__(self):
    self.total, self.n, self.seen = None, 0, []

  def reset(self, total):
    self.total, self.n = total, 0

  def update(self, n):
    self.n += n

  def set_postfix_str(self, what, refresh=True):
    del refresh
    self.seen.append(what)


def test_compress_during_prefill_rows_next_to_after_prefill(chat_tiny):
  """Each cell gets an 'after' and a 'during' row; 'during' never allocated the full cache."""
  from kvlab import models  # pylint: disable=g-import-not-at-top
  from kvlab.lib import methods  # pylint: disable=g-import-not-at-top
  from kvlab.lib.eval.runner import run_sample  # pylint: disable=g-import-not-at-top

  lm = models.load(chat_tiny, progress=False)
  count = lambda s: len(lm.tokenizer.encode(s, add_special_tokens=False))
  s = make_sample("niah_single", 400, 0, count)
  cells = [(n, 0.25, methods.make(n, ratio=0.25)) for n in ("streaming_llm", "h2o")]
  progress = _Steps()
  rows = run_sample(lm, s, cells, protocol="query_agnostic", max_new_tokens=4, chunk_size=64,
                    during_prefill=True, progress=progress)
  # progress within the sample: prefill, full cache, then 2 cells x 2 modes compressed, answered
  assert progress.total == progress.n == 2 + 2 * 2 * 2
  assert progress.seen[:2] == ["prefill", "full cache"] and "answered h2o @ 0.25" in progress.seen
  assert [(r["method"], r["prefill_mode"]) for r in rows] == [
      ("full", "after"), ("streaming_llm", "after"), ("streaming_llm", "during"),
      ("h2o", "after"), ("h2o", "during")]
  full = rows[0]["full_bytes"]
  for r in rows[1:]:
    assert r["cache_bytes"] < full / 3
    if r["prefill_mode"] == "during":  # budget + one chunk, never the full cache
      assert r["peak_cache_bytes"] < full / 2 and r["peak_cache_bytes"] >= r["cache_bytes"]
    else:
      assert r["peak_cache_bytes"] == full
  cells_ = aggregate.cells(rows)
  assert {c["method"] for c in cells_} == {"full", "streaming_llm", "streaming_llm [during prefill]",
                                          "h2o", "h2o [during prefill]"}
  assert "| h2o [during prefill] | 0.25 |" in report.leaderboard(cells_)


def test_quantize_each_chunk_rows_next_to_the_other_modes(chat_tiny):
  """evict+kivi with quantize_each_chunk: a third row per cell whose peak is below the
  quantize-at-the-end row's (the float cache is KIVI's window + one chunk, the kept packed;
  with 2 layers the one layer dequantized for scoring is a large part of it). Keys packed at
  KIVI's bits between chunks (``prefill_key_bits=4``): on this tiny model the default 8-bit
  staging plus the final re-pack peaks above the quantize-at-the-end row (166 896 vs 156 692
  bytes); on the default model at 8k it is 57 vs 119 MB."""
  from kvlab import models  # pylint: disable=g-import-not-at-top
  from kvlab.lib import methods  # pylint: disable=g-import-not-at-top
  from kvlab.lib.eval.runner import run_sample  # pylint: disable=g-import-not-at-top

  lm = models.load(chat_tiny, progress=False)
  count = lambda s: len(lm.tokenizer.encode(s, add_special_tokens=False))
  s = make_sample("niah_single", 1000, 0, count)
  spec = "snapkv+kivi4:group=8:residual=16:prefill_key_bits=4"
  rows = run_sample(lm, s, [(spec, 0.5, methods.make(spec, ratio=0.5))],
                    protocol="query_agnostic", max_new_tokens=4, chunk_size=64,
                    during_prefill=True, quantize_each_chunk=True)
  assert [r["prefill_mode"] for r in rows] == ["after", "after", "during", "during_quantized"]
  by = {r["prefill_mode"]: r for r in rows[1:]}
  assert by["during_quantized"]["peak_cache_bytes"] < by["during"]["peak_cache_bytes"]
  assert all(np.isfinite(r["kl"]) for r in rows)
  assert f"| {spec} [during prefill, quantized each chunk] | 0.5 |" in (
      report.leaderboard(aggregate.cells(rows)))


def test_compress_during_prefill_rejects_compositions(chat_tiny, tmp_path):
  cmd = [sys.executable, "-m", "experiments.evaluate", f"--model={chat_tiny}", "--lengths=200",
         "--num_samples=1", "--method=knorm:ratio=0.5+snapkv", "--compress_during_prefill",
         f"--out={tmp_path / 'x.jsonl'}"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert out.returncode != 0 and "one eviction method, optionally followed by" in out.stderr
  cmd[cmd.index("--method=knorm:ratio=0.5+snapkv")] = "--method=snapkv+kvquant4"
  out = subprocess.run(cmd + ["--quantize_each_chunk"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode != 0 and "one KIVI quantizer" in out.stderr
  out = subprocess.run([c for c in cmd if c != "--compress_during_prefill"]
                       + ["--quantize_each_chunk"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode != 0 and "mode of compress_during_prefill" in out.stderr


def test_offline_text_is_the_same_in_every_process():
  """The stdlib-docs text must not depend on the process (object addresses in pydoc's default
  values) or on what the caller imported and configured (logging's handler list)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  code = ("import sys, hashlib; sys.path.insert(0, {root!r}); {pre}"
          "from kvlab.lib.data.text import stdlib_docs; "
          "print(hashlib.sha256(stdlib_docs().encode()).hexdigest())")
  digests = set()
  for pre in ("", "import logging; logging.basicConfig(); logging.getLogger('x').addHandler("
              "logging.StreamHandler()); "):
    out = subprocess.run([sys.executable, "-c", code.format(root=ROOT, pre=pre)],
                         capture_output=True, text=True, timeout=300, check=True)
    digests.add(out.stdout.strip())
  from kvlab.lib.data.text import stdlib_docs  # pylint: disable=g-import-not-at-top
  digests.add(hashlib.sha256(stdlib_docs().encode()).hexdigest())
  assert len(digests) == 1, digests
  assert " at 0x" not in stdlib_docs()


def test_batched_cells_answer_as_they_would_alone(chat_tiny):
  """Plain-cache cells (paged AdaKV through its padded view too) decoded as one batch give the
  rows each gives alone; decode-time evicting cells and cells with a stored part (ThinK's pruned
  channels) still run alone."""
  from kvlab import models  # pylint: disable=g-import-not-at-top
  from kvlab.lib import methods  # pylint: disable=g-import-not-at-top
  from kvlab.lib.eval.batching import stack_rows  # pylint: disable=g-import-not-at-top
  from kvlab.lib.eval.runner import run_sample  # pylint: disable=g-import-not-at-top

  lm = models.load(chat_tiny, progress=False)
  count = lambda s: len(lm.tokenizer.encode(s, add_special_tokens=False))
  s = make_sample("niah_single", 400, 3, count)
  specs = [("snapkv", 0.25), ("knorm", 0.75), ("adakv", 0.25), ("h2o", 0.5),
           ("snapkv+think", 0.5)]
  cells = [(n, r, methods.make(n, ratio=r)) for n, r in specs]
  alone = run_sample(lm, s, cells, protocol="query_agnostic", max_new_tokens=8, batch_cells=1)
  together = run_sample(lm, s, cells, protocol="query_agnostic", max_new_tokens=8,
                        batch_cells=2)
  assert [r["method"] for r in together] == ["full"] + [n for n, _ in specs]
  batches = collections.Counter(r["answer_batch"] for r in together[1:])
  assert batches == {2: 2, 1: 3}  # 3 plain cells: one batch of 2 and one alone; h2o, think alone
  assert all(r["answer_batch"] == 1 for r in alone)
  for a, t in zip(alone, together):
    assert a["method"] == t["method"] and a["prediction"] == t["prediction"]
    assert a["cache_bytes"] == t["cache_bytes"] and a["score"] == t["score"]
    assert abs(a["kl"] - t["kl"]) < 1e-4 and abs(a["ll"] - t["ll"]) < 1e-3
  by_method = {r["method"]: r["answer_batch"] for r in together}
  assert by_method["h2o"] == 1 and by_method["adakv"] == 2  # AdaKV batched via its padded view
  with pytest.raises(ValueError, match="at least one"):
    stack_rows([], 8)
  with pytest.raises(ValueError, match="batch_cells"):
    run_sample(lm, s, cells, protocol="query_agnostic", max_new_tokens=8, batch_cells=0)


def test_score_plot_accepts_a_bound_a_rounding_error_past_the_mean(tmp_path):
  """A 100 % cell whose Wilson upper bound rounds just below 1 used to stop the report."""
  stat = lambda m, lo, hi: {"mean": m, "ci95": [lo, hi], "n": 19}
  cells = [{"task": "niah_single", "length": 2048, "protocol": "query_agnostic", "method": m,
            "ratio": r, "score": stat(1.0, 0.83, 1.0 - 1e-12)} for m, r in
           (("full", 1.0), ("tova", 0.75), ("tova", 0.5))]
  report.plot_score_vs_ratio(cells, str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").stat().st_size > 1000


def _row(method, sample, score, haystack=None, task="niah_single"):
  r = {"task": task, "length": 1024, "protocol": "query_agnostic", "method": method,
       "ratio": 1.0 if method == "full" else 0.5, "sample": sample, "score": score,
       "cache_bytes": 1, "full_bytes": 2}
  if haystack:
    r["config"] = {"haystack": haystack}
  return r


def test_merged_files_count_each_sample_once():
  """Two evaluations' files both hold ``full`` rows of the same samples: one n, not two."""
  a = [_row("full", s, 1.0) for s in range(3)] + [_row("tova", s, 1.0) for s in range(3)]
  b = [_row("full", s, 1.0, "noise") for s in range(3)] + [_row("kvzip", s, 0.0)
                                                          for s in range(3)]
  rows, repeats = aggregate.unique_rows(a + b)
  assert repeats == 3 and len(rows) == 9
  n = {c["method"]: c["score"]["n"] for c in aggregate.cells(rows)}
  assert n == {"full": 3, "tova": 3, "kvzip": 3}
  # The same samples on another haystack are other measurements, in other cells.
  docs = [_row("full", s, 0.0, "docs") for s in range(3)]
  rows, repeats = aggregate.unique_rows(a + docs)
  assert repeats == 0
  cells = {(c["task"], c["method"]): c["score"] for c in aggregate.cells(rows)}
  assert cells[("niah_single", "full")]["mean"] == 1.0
  assert cells[("niah_single [docs haystack]", "full")]["mean"] == 0.0
  assert "### niah_single [docs haystack], 1024 tokens" in report.leaderboard(
      aggregate.cells(rows))


def test_resume_skips_only_rows_of_the_same_haystack(tmp_path):
  p = tmp_path / "rows.jsonl"
  rows = [_row("full", 0, 1.0), _row("full", 1, 1.0, "docs"),
          _row("full", 2, 1.0, task="perplexity")]
  p.write_text("".join(json.dumps(r) + "\n" for r in rows))
  samples = lambda done: sorted(k[3] for k in done)
  assert samples(aggregate.done_keys(str(p), "noise")) == [0, 2]
  assert samples(aggregate.done_keys(str(p), "docs")) == [1, 2]
