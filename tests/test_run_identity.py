"""Every evaluation row carries its run identity; a resume skips only rows of the same run and
refuses to mix runs silently (issue: nothing silently wrong, item 1)."""

import json
import os
import subprocess
import sys

import pytest

from kvlab.lib.eval import aggregate, identity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ident(**over):
  base = dict(model="m", model_fingerprint="w1-aaaa", dtype="float32", git="abc123",
              protocol="query_agnostic", haystack="noise", depths=[], max_new_tokens=48,
              continuation=256, chunk_size=512, attn_block_size=512, batch_cells=8)
  return identity.identity(**{**base, **over})


def test_run_id_changes_with_every_field():
  base = _ident()
  changed = [_ident(model_fingerprint="w1-bbbb"), _ident(dtype="bfloat16"), _ident(git="def"),
             _ident(haystack="docs"), _ident(depths=[0.5]), _ident(max_new_tokens=32),
             _ident(chunk_size=256), _ident(protocol="query_aware")]
  ids = {identity.run_id(base)} | {identity.run_id(c) for c in changed}
  assert len(ids) == len(changed) + 1
  # The setting ignores the commit and answer batching only.
  assert identity.setting_id(_ident(git="def", batch_cells=1)) == identity.setting_id(base)
  assert identity.setting_id(_ident(dtype="bfloat16")) != identity.setting_id(base)


def test_check_resume_refuses_rows_of_another_run_naming_the_difference():
  old, new = _ident(), _ident(model_fingerprint="w1-bbbb", max_new_tokens=32)
  rows = [{"run": identity.run_id(old), "identity": old, "task": "t"}]
  with pytest.raises(identity.MixedRunsError,
                     match="max_new_tokens: 48 -> 32.*model_fingerprint: w1-aaaa -> w1-bbbb|"
                           "model_fingerprint: w1-aaaa -> w1-bbbb.*max_new_tokens: 48 -> 32"):
    identity.check_resume(rows, new, "rows.jsonl", append_run=False)
  assert identity.check_resume(rows, new, "rows.jsonl", append_run=True) == []
  assert identity.check_resume(rows, old, "rows.jsonl", append_run=False) == rows
  legacy = [{"task": "t", "config": {"model": "smollm2-135m"}, "git": "1234"}]
  with pytest.raises(identity.MixedRunsError, match="before runs were identified"):
    identity.check_resume(legacy, new, "rows.jsonl", append_run=False)


def _row(ident, method="knorm", score=1.0, sample=0):
  return {"task": "niah_single", "length": 200, "protocol": "query_agnostic", "sample": sample,
          "method": method, "ratio": 0.5, "score": score, "kl": 0.0, "top1": 1.0,
          "cache_bytes": 1, "full_bytes": 2, "run": identity.run_id(ident), "identity": ident}


def test_report_never_merges_two_models_or_settings_into_one_cell():
  a, b = _ident(), _ident(model="other", model_fingerprint="w1-bbbb")
  c = _ident(max_new_tokens=32)
  rows = [_row(a, score=1.0), _row(b, score=0.0), _row(c, score=0.0)]
  cells = aggregate.cells(aggregate.unique_rows(rows)[0])
  assert len(cells) == 3 and all(cell["score"]["n"] == 1 for cell in cells)
  assert any(cell["task"].startswith("other: ") for cell in cells)
  # Two commits of one setting are one measurement: counted once.
  same = [_row(a, score=1.0), _row(_ident(git="zzz"), score=1.0)]
  uniq, dropped = aggregate.unique_rows(same)
  assert dropped == 1 and len(aggregate.cells(uniq)) == 1


def _evaluate(model, out, *extra):
  cmd = [sys.executable, "-m", "experiments.evaluate", f"--model={model}", "--lengths=200",
         "--num_samples=1", "--method=knorm", "--ratio=0.5", "--max_new_tokens=4",
         f"--out={out}", *extra]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_evaluate_refuses_to_resume_under_changed_settings(chat_tiny, tmp_path):
  out = tmp_path / "rows.jsonl"
  assert _evaluate(chat_tiny, out).returncode == 0
  first = open(out).read()
  rows = [json.loads(line) for line in first.splitlines()]
  assert len(rows) == 2 and len({r["run"] for r in rows}) == 1
  assert rows[0]["identity"]["model_fingerprint"] and rows[0]["identity"]["dtype"] == "float32"
  proc = _evaluate(chat_tiny, out, "--max_new_tokens=5")
  assert proc.returncode != 0
  assert "max_new_tokens: 4 -> 5" in proc.stderr and "--append_run" in proc.stderr
  assert open(out).read() == first  # nothing skipped as done, nothing written
  proc = _evaluate(chat_tiny, out, "--max_new_tokens=5", "--append_run")
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(line) for line in open(out)]
  assert len(rows) == 4 and len({r["run"] for r in rows}) == 2
  cells = aggregate.cells(aggregate.unique_rows(rows)[0])
  assert len(cells) == 4 and all(c["score"]["n"] == 1 for c in cells)


def test_a_second_evaluate_on_the_same_out_is_refused(chat_tiny, tmp_path):
  """Item 9: two writers to one --out duplicated every row; the second is now refused."""
  from kvlab.lib import jsonl  # pylint: disable=g-import-not-at-top
  out = tmp_path / "rows.jsonl"
  with jsonl.appender(str(out)):  # another evaluate holds the file
    proc = _evaluate(chat_tiny, out)
  assert proc.returncode != 0
  assert "another writer" in proc.stderr and "another --out" in proc.stderr, proc.stderr[-2000:]
  assert not out.read_text().strip()
