"""Result files (JSON lines): torn last lines, corrupt lines, and one writer at a time."""

import json
import os
import re
import subprocess
import sys
import warnings

import pytest

from kvlab.lib.eval import aggregate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = {"task": "niah_single", "length": 1024, "protocol": "query_aware", "method": "snapkv",
       "ratio": 0.25, "score": 1.0}


def _write(path, rows, tail=""):
  """``rows`` one a line, then ``tail`` as is (a torn row: no newline) -> ``path``."""
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
    f.write(tail)
  return str(path)


def _rows(n):
  return [{**ROW, "sample": i} for i in range(n)]


def test_read_skips_a_torn_last_line_with_a_warning(tmp_path):
  from kvlab.lib import jsonl  # pylint: disable=g-import-not-at-top
  p = _write(tmp_path / "eval.jsonl", _rows(2), tail='{"task": "niah_single", "len')
  with pytest.warns(UserWarning, match=r"eval\.jsonl:3: skipped a torn last line"):
    assert jsonl.read(p) == _rows(2)
  p = _write(tmp_path / "blank_end.jsonl", _rows(2), tail='{"task": "ni\n\n')  # still the last
  with pytest.warns(UserWarning, match=r"blank_end\.jsonl:3: skipped"):
    assert jsonl.read(p) == _rows(2)


def test_read_raises_on_a_bad_line_before_the_last_naming_file_and_line(tmp_path):
  from kvlab.lib import jsonl  # pylint: disable=g-import-not-at-top
  # what appending after a torn row (without repairing it first) used to leave
  p = _write(tmp_path / "eval.jsonl", _rows(1), tail='{"task": "ni' + json.dumps(ROW) + "\n"
             + json.dumps(ROW) + "\n")
  with pytest.raises(ValueError, match=r"eval\.jsonl:2: not a JSON object: '\{\"task\": \"ni"
                     r".*remove or fix that line"):
    jsonl.read(p)


def test_repair_then_append_gives_a_clean_file(tmp_path):
  from kvlab.lib import jsonl  # pylint: disable=g-import-not-at-top
  p = _write(tmp_path / "eval.jsonl", _rows(2), tail='{"task": "ni')
  with pytest.warns(UserWarning, match=r"eval\.jsonl:3: removed a torn last line"):
    assert jsonl.repair(p) == len('{"task": "ni')
  with open(p, "a") as f:
    f.write(json.dumps(_rows(3)[2]) + "\n")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert jsonl.read(p) == _rows(3)
    assert jsonl.repair(p) == 0  # clean: untouched
    # a whole last row that only lacks its newline gets one, through the appender too
    q = _write(tmp_path / "no_newline.jsonl", _rows(1), tail=json.dumps(_rows(2)[1]))
    with jsonl.appender(q) as out:
      out.write(_rows(3)[2])
    assert jsonl.read(q) == _rows(3)
  # the appender repairs a torn tail itself before its first write
  r = _write(tmp_path / "torn.jsonl", _rows(1), tail='{"sam')
  with pytest.warns(UserWarning, match="removed a torn last line"):
    with jsonl.appender(r) as out:
      out.write(_rows(2)[1])
  with open(r) as f:
    assert f.read() == "".join(json.dumps(x) + "\n" for x in _rows(2))
  assert not os.path.exists(r + ".lock")  # removed on release


_HOLDER = """
import sys
from kvlab.lib import jsonl
with jsonl.appender(sys.argv[1]) as out:
  out.write({"sample": 0})
  print("held", flush=True)
  sys.stdin.readline()
"""


def _hold(path):
  """A process that holds ``appender(path)`` until its stdin is closed (or it is killed)."""
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, path], cwd=ROOT, text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_appender_fails_clearly_while_another_process_holds_the_file(tmp_path):
  from kvlab.lib import jsonl  # pylint: disable=g-import-not-at-top
  p = str(tmp_path / "eval.jsonl")
  proc = _hold(p)
  try:
    with pytest.raises(jsonl.LockedError, match=rf"eval\.jsonl is being appended to by another "
                       rf"writer \(pid {proc.pid}: -c {re.escape(p)}.*; wait for it.*another file"):
      with jsonl.appender(p):
        pytest.fail("a second appender got the file while another process held it")
  finally:
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
  with jsonl.appender(p) as out:  # released
    out.write({"sample": 1})
  assert jsonl.read(p) == [{"sample": 0}, {"sample": 1}]
  # a holder killed outright leaves its lock file behind, but not the lock
  proc = _hold(p)
  proc.kill()
  proc.wait(timeout=60)
  assert os.path.exists(p + ".lock")
  with jsonl.appender(p) as out:
    out.write({"sample": 2})
  assert [r["sample"] for r in jsonl.read(p)] == [0, 1, 0, 2]


def test_aggregate_read_rows_and_done_keys_skip_a_torn_last_line(tmp_path):
  p = _write(tmp_path / "eval.jsonl", _rows(2), tail='{"task": "niah_single", "len')
  with pytest.warns(UserWarning, match=r"eval\.jsonl:3: skipped a torn last line"):
    assert aggregate.read_rows([p]) == _rows(2)
  with pytest.warns(UserWarning, match=r"eval\.jsonl:3: skipped a torn last line"):
    keys = aggregate.done_keys(p, "noise")
  assert sorted(k[3] for k in keys) == [0, 1]


def test_matryoshka_metrics_reader_skips_a_torn_last_line(tmp_path):
  from kvlab.lib.lowrank import matryoshka_train as mt  # pylint: disable=g-import-not-at-top
  steps = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
  p = _write(tmp_path / "metrics.jsonl", steps, tail='{"step": 4, "lo')
  with pytest.warns(UserWarning, match=r"metrics\.jsonl:4: skipped a torn last line"):
    mt._truncate(p, 2)  # pylint: disable=protected-access
  with open(p) as f:
    assert [json.loads(line) for line in f] == steps[:2]


def test_report_on_a_file_without_rows_gives_one_clear_error(tmp_path):
  empty = _write(tmp_path / "empty.jsonl", [])
  blank = _write(tmp_path / "blank.jsonl", [], tail="\n\n")
  proc = subprocess.run([sys.executable, "-m", "experiments.report", f"--inputs={empty},{blank}",
                         f"--out_dir={tmp_path / 'report'}"], cwd=ROOT, capture_output=True,
                        text=True)
  assert proc.returncode != 0
  assert f"no rows in {empty}, {blank}: " in proc.stderr, proc.stderr[-2000:]
  assert "--num_samples" in proc.stderr and "Traceback" not in proc.stderr
