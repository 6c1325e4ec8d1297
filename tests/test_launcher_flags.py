"""Bad launcher flags are refused at parse time, naming the flag, before a model loads or an
output file is opened (issue: nothing silently wrong, items 7 and 8)."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A model path that does not exist: a flag error must come before the load would fail.
_NO_MODEL = "/nonexistent/model-dir"

EVALUATE_CASES = [
    (["--lengths=0"], "--lengths.*below the minimum of 1"),
    (["--lengths=-5"], "--lengths.*below the minimum of 1"),
    (["--lengths=abc"], "--lengths.*'abc' is not an integer"),
    (["--ratio=abc"], "--ratio.*'abc' is not a number"),
    (["--ratio=1.5"], "--ratio.*outside \\(0, 1\\]"),
    (["--ratio=0.5,0.5"], "--ratio.*listed twice"),
    (["--depths=2"], "--depths.*outside \\[0, 1\\]"),
    (["--num_samples=0"], "--num_samples.*must be >= 1"),
    (["--max_new_tokens=0"], "--max_new_tokens.*must be >= 1"),
    (["--chunk_size=0"], "--chunk_size.*must be >= 8"),
    (["--chunk_size=-4"], "--chunk_size.*must be >= 8"),
    (["--task=bogus"], "--task.*unknown 'bogus'"),
    (["--method=knorm,knorm"], "knorm is listed twice"),
    (["--method=snapkv+"], "--method=snapkv\\+.*empty"),
    (["--method=snapkv:window=-3"], "--method=snapkv:window=-3.*window"),
    (["--method=snapkv:window=0"], "--method=snapkv:window=0.*window"),
    (["--method=snapkv:window=abc"], "--method=snapkv:window=abc.*window"),
    (["--method=nosuch"], "unknown method 'nosuch'"),
]


# One process per launcher: it imports the launcher once and parses every case's flags with
# absl (the same validators ``app.run`` applies), reporting each case's error. The
# not-UTF-8 case below runs the launcher itself, end to end.
_PARSE = """
import json, sys
from absl import flags
import importlib
importlib.import_module(sys.argv[1])
out = []
for args in json.loads(sys.argv[2]):
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS([sys.argv[1]] + args)
    out.append("")
  except flags.Error as e:
    out.append(str(e))
print(json.dumps(out))
"""


def _parse_errors(module, cases, tmp_path):
  """The flag error of each case's args (``""`` where they parsed)."""
  base = [f"--model={_NO_MODEL}"]
  if module.endswith("evaluate"):
    base.append(f"--out={tmp_path / 'rows.jsonl'}")
  argvs = [base + a for a, _ in cases]
  proc = subprocess.run([sys.executable, "-c", _PARSE, module, json.dumps(argvs)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_evaluate_refuses_bad_flags_at_parse_time(tmp_path):
  errors = _parse_errors("experiments.evaluate", EVALUATE_CASES, tmp_path)
  for (args, message), err in zip(EVALUATE_CASES, errors):
    flag = args[0].split("=")[0]
    assert err and re.search(message, f"{flag} {err}", re.S), (args, err)
  assert not (tmp_path / "rows.jsonl").exists(), "an output file was opened at parse time"


GENERATE_CASES = [
    (["--max_new_tokens=0"], "--max_new_tokens.*must be >= 1"),
    (["--max_new_tokens=0", "--stream"], "--max_new_tokens.*must be >= 1"),
    (["--max_new_tokens=0", "--method=snapkv"], "--max_new_tokens.*must be >= 1"),
    (["--chunk_size=0"], "--chunk_size.*must be >= 8"),
    (["--ratio=0"], "--ratio.*must be in \\(0, 1\\]"),
    (["--method=snapkv:window=abc"], "--method=snapkv:window=abc"),
    (["--method=kvzip+snapkv"], "--method=kvzip\\+snapkv"),
]


def test_generate_refuses_bad_flags_at_parse_time(tmp_path):
  errors = _parse_errors("experiments.generate", GENERATE_CASES, tmp_path)
  for (args, message), err in zip(GENERATE_CASES, errors):
    flag = args[0].split("=")[0]
    assert err and re.search(message, f"{flag} {err}", re.S), (args, err)


def test_a_good_command_line_parses(tmp_path):
  """The checks refuse only what is wrong: the README's kinds of command lines parse."""
  good = [(["--lengths=1024,2048", "--ratio=0.25,0.5", "--method=snapkv,knorm+kivi",
            "--depths=0,0.5,1", "--task=niah_single,perplexity"], "")]
  assert _parse_errors("experiments.evaluate", good, tmp_path) == [""]


def test_evaluate_end_to_end_refuses_before_loading_or_writing(tmp_path):
  out = tmp_path / "rows.jsonl"
  cmd = [sys.executable, "-m", "experiments.evaluate", f"--model={_NO_MODEL}", f"--out={out}",
         "--lengths=0"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "--lengths" in proc.stderr, proc.stderr[-2000:]
  assert "not found" not in proc.stderr, "the model was looked up before the flags were checked"
  assert not out.exists()


def test_generate_refuses_a_prompt_that_is_not_utf8():
  # A shell passes undecodable bytes through to Python as lone surrogates.
  cmd = [sys.executable.encode(), b"-m", b"experiments.generate",
         f"--model={_NO_MODEL}".encode(), b"--prompt=caf\xe9 au lait"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=120)
  err = proc.stderr.decode("utf-8", "replace")
  assert proc.returncode != 0 and "--prompt" in err and "not valid UTF-8" in err, err[-2000:]


def test_huge_max_new_tokens_names_the_flag():
  from kvlab.lib import generate as gen  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="max_new_tokens=1000000000 is not below the model's "
                                       "context limit of 8192"):
    gen.check_context([36], 10**9, 8192)
