"""Per-sample rows -> per-cell statistics (mean and 95 % CI of every metric)."""

from __future__ import annotations

import collections
import os

from kvlab.lib import jsonl
from kvlab.lib.eval import identity
from kvlab.lib.eval.metrics import mean_ci
from kvlab.lib.eval.tasks import DEFAULT_NEEDLE, uses_needle

CELL_KEYS = ("task", "length", "protocol", "method", "ratio")
METRICS = ("score", "ppl", "kl", "top1", "ll", "ll_ref", "cache_bytes", "full_bytes",
           "peak_cache_bytes", "prefill_s", "compress_s", "answer_s")


def label(row: dict) -> str:
  """The method name a table shows: ``snapkv`` (compressed after prefill) or
  ``snapkv [during prefill]`` (compressed after every prefill chunk, ``lib.online``), or
  ``snapkv+kivi [during prefill, quantized each chunk]`` (``lib.online_quantized``)."""
  mode = row.get("prefill_mode")
  if mode == "during":
    return f"{row['method']} [during prefill]"
  if mode == "during_quantized":
    return f"{row['method']} [during prefill, quantized each chunk]"
  return row["method"]


def task_label(row: dict, with_haystack: bool = True) -> str:
  """``niah_single`` (noise haystack and number needle, the defaults), ``niah_single [docs
  haystack]``, ``niah_single [code haystack, uuid needle]``; ``with_haystack=False`` leaves the
  haystack out (the label a task shares across haystacks)."""
  h, nd = haystack(row), needle(row)
  extra = ([f"{h} haystack"] if with_haystack and h not in (None, "noise") else []) + (
      [f"{nd} needle"] if nd not in (None, DEFAULT_NEEDLE) else [])
  return f"{row['task']} [{', '.join(extra)}]" if extra else row["task"]


def read_rows(paths) -> list[dict]:
  """Every result row (one JSON object per line) of the JSONL files ``paths``, in order; a
  torn last line (a run killed mid-write) is skipped with a warning (``lib.jsonl.read``)."""
  rows = []
  for p in paths:
    rows += jsonl.read(p)
  return rows


def row_key(row: dict) -> tuple:
  """A row's place in its run: ``(task, length, protocol, sample, method, ratio, prefill
  mode)``; a resumed evaluation skips a (task, length, sample, cell) whose key it has."""
  return (row["task"], row["length"], row["protocol"], row["sample"], row["method"],
          row["ratio"], row.get("prefill_mode", "after"))


def model_label(row: dict) -> str | None:
  """The model a row was measured on (its ``--model``)."""
  return row.get("identity", {}).get("model") or row.get("config", {}).get("model")


def setting(row: dict) -> str | None:
  """The row's setting (``lib.eval.identity.setting_id``: model weights, dtype and every flag
  that shapes a row, not the commit); None for rows from before identities were recorded."""
  return identity.setting_id(row.get("identity"))


def sample_key(row: dict) -> tuple:
  """What makes a row one measurement: its cell, its sample (the task seed), haystack, needle
  format and setting (rows of one setting written by two runs count once; of two settings,
  twice)."""
  return (tuple(label(row) if k == "method" else row.get(k) for k in CELL_KEYS)
          + (row.get("sample"), haystack(row), needle(row), model_label(row), setting(row)))


def haystack(row: dict) -> str | None:
  """The needle filler a row's sample was built on (``noise`` for rows that predate the
  flag); None for perplexity rows, whose text does not depend on it."""
  if row.get("task") == "perplexity":
    return None
  return row.get("config", {}).get("haystack", "noise")


def needle(row: dict) -> str | None:
  """The needle format of a niah row (``number`` for rows that predate the flag); None for
  the other tasks, which have none."""
  if not uses_needle(row.get("task")):
    return None
  return row.get("config", {}).get("needle", DEFAULT_NEEDLE)


def unique_rows(rows: list[dict]) -> tuple[list[dict], int]:
  """``rows`` with each measurement once (the last row of each ``sample_key`` wins), and how
  many repeats were dropped. Files merged in one report often share rows (every evaluation
  writes its own ``full`` rows for the same samples); counting them twice would double a
  cell's n and narrow its interval for no new evidence."""
  last = {sample_key(r): i for i, r in enumerate(rows)}
  keep = sorted(last.values())
  return [rows[i] for i in keep], len(rows) - len(keep)


def core_setting(row: dict) -> str | None:
  """The row's setting without its haystack and needle format: what the rows of one run share
  across the haystacks and needles it was given (None for rows without an identity)."""
  return identity.setting_id(row.get("identity"), without=("haystack", "needle"))


def cells(rows: list[dict]) -> list[dict]:
  """Groups rows by (task, length, protocol, method label, ratio) and summarises each metric.

  A cell's ``method`` is ``label(row)``: the two prefill modes of one method are two cells;
  its ``task`` is ``task_label(row)``: needles in the docs haystack, or in another needle
  format, are other cells than in the noise one. Each cell also names its ``haystack`` and
  ``needle`` (None where the task has none) and its ``base`` task label (the ``task`` without
  the haystack: the cells a report averages over haystacks share it)."""
  groups = collections.defaultdict(list)
  models = {model_label(r) for r in rows}
  settings = collections.defaultdict(set)  # model -> its settings (None: no identity)
  for r in rows:
    settings[model_label(r)].add(core_setting(r))

  def task_of(r, with_haystack=True):
    """The task label, with the model when rows span several models and the setting when
    one model's rows span several settings (besides their haystacks and needles, which the
    label names): such rows are never one cell."""
    t = task_label(r, with_haystack)
    if len(settings[model_label(r)]) > 1:
      t = f"{t} [setting {core_setting(r) or 'unrecorded'}]"
    if len(models) > 1:
      t = f"{model_label(r)}: {t}"
    return t

  for r in rows:
    groups[tuple(label(r) if k == "method" else task_of(r) if k == "task" else r.get(k)
                 for k in CELL_KEYS)].append(r)
  out = []
  for key, rs in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
    cell = dict(zip(CELL_KEYS, key))
    cell.update(haystack=haystack(rs[0]), needle=needle(rs[0]),
                base=task_of(rs[0], with_haystack=False))
    for m in METRICS:
      cell[m] = mean_ci([r.get(m) for r in rs], outcomes=m == "score")
    cell["bytes_ratio"] = (cell["cache_bytes"]["mean"] / cell["full_bytes"]["mean"]
                           if cell["full_bytes"]["mean"] else None)
    peak = cell["peak_cache_bytes"]["mean"]
    cell["peak_ratio"] = (peak / cell["full_bytes"]["mean"]
                          if peak is not None and cell["full_bytes"]["mean"] else None)
    cell["git"] = sorted({r.get("git") for r in rs if r.get("git")})
    out.append(cell)
  return out


def done_keys(path: str, filler: str | None, needle_format: str = DEFAULT_NEEDLE) -> set:
  """Keys of the rows already in ``path`` for this ``filler`` and needle format (rows of
  another filler or needle are other samples: a run with ``--haystack=docs`` into a file of
  noise rows must not skip); a torn last line is skipped with a warning, as in ``read_rows``."""
  if not os.path.exists(path):
    return set()
  keys = set()
  for r in jsonl.read(path):
    if haystack(r) not in (None, filler) or needle(r) not in (None, needle_format):
      continue
    keys.add((r["task"], r["length"], r["protocol"], r["sample"], r["method"], r["ratio"],
              r.get("prefill_mode", "after")))
  return keys
