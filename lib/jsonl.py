"""Result files of one JSON object a line, safe against a crash mid-write and a second writer.

A process killed while appending leaves a torn last line (part of a row, no newline). ``read``
skips it with a warning, ``repair`` cuts it off so the next append starts on a clean line, and
``appender`` does both for a writer, under an exclusive lock so that two runs given the same
output file fail at once instead of interleaving rows:

  with jsonl.appender("results/eval.jsonl") as out:
    out.write({"task": "niah", "score": 1.0})
  rows = jsonl.read("results/eval.jsonl")

Any other unparsable line is corruption, not a crash: ``read`` raises naming its file and line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import warnings


class LockedError(RuntimeError):
  """Another process (or another ``appender`` in this one) is appending to the file."""


def _parse(line: bytes):
  """The row of one line -> dict, or None if it is not one JSON object."""
  try:
    row = json.loads(line)
  except ValueError:  # JSONDecodeError, or a UnicodeDecodeError from a torn character
    return None
  return row if isinstance(row, dict) else None


def _last_line(data: bytes) -> tuple[int, int]:
  """``(offset, line number)`` of the last non-blank line of ``data`` (line numbers from 1)."""
  end = len(data.rstrip())
  start = data.rfind(b"\n", 0, end) + 1
  return start, data.count(b"\n", 0, start) + 1


def read(path: str) -> list[dict]:
  """Every row of ``path`` -> list of dicts, in file order; blank lines are ignored.

  An unparsable last line (torn by a crash mid-write) is skipped with a ``warnings.warn``
  naming the file and line; an unparsable line before it raises ``ValueError``."""
  with open(path, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")
  last = max((i for i, l in enumerate(lines) if l.strip()), default=-1)
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    row = _parse(line)
    if row is not None:
      rows.append(row)
    elif i == last:
      warnings.warn(f"{path}:{i + 1}: skipped a torn last line ({len(line)} bytes, "
                    f"{_show(line)}), the mark of a writer stopped mid-row; the next append "
                    "(jsonl.appender) or jsonl.repair removes it", stacklevel=2)
    else:
      raise ValueError(f"{path}:{i + 1}: not a JSON object: {_show(line)}; only the last line "
                       "may be torn (a crash mid-write): remove or fix that line")
  return rows


def _show(line: bytes, n: int = 80) -> str:
  text = line.decode("utf-8", "replace")
  return repr(text[:n]) + ("..." if len(text) > n else "")


def repair(path: str) -> int:
  """Cuts a torn last line off ``path`` in place (the line ``read`` skips) -> bytes removed.

  A last row that is whole but lacks its newline gets one (0 bytes removed). Does nothing to a
  missing or clean file. Not locked: call it where no one else writes (``appender`` does)."""
  if not os.path.exists(path):
    return 0
  with open(path, "r+b") as f:
    data = f.read()
    start, lineno = _last_line(data)
    tail = data[start:]
    if not tail.strip():
      return 0
    if _parse(tail) is not None:
      if not data.endswith(b"\n"):
        f.write(b"\n")
      return 0
    f.truncate(start)
  warnings.warn(f"{path}:{lineno}: removed a torn last line ({len(tail)} bytes, {_show(tail)}),"
                " the mark of a writer stopped mid-row", stacklevel=2)
  return len(tail)


class _Writer:
  """``write(row)``: one ``json.dumps(row) + "\\n"`` per ``os.write`` on an ``O_APPEND`` fd."""

  def __init__(self, path: str, fd: int, fsync: bool):
    self.path = path
    self._fd = fd
    self._fsync = fsync

  def write(self, row: dict) -> None:
    """Appends ``row`` as one line; it is on disk (fsync) before this returns."""
    if self._fd is None:
      raise ValueError(f"{self.path}: write after the appender closed; write inside its with")
    data = (json.dumps(row) + "\n").encode()
    while data:  # a regular file takes it whole; the loop is for a signal mid-write
      data = data[os.write(self._fd, data):]
    if self._fsync:
      os.fsync(self._fd)


def _holder(lock_path: str) -> str:
  try:
    with open(lock_path) as f:
      text = f.read().strip()
  except OSError:
    text = ""
  pid, _, cmd = text.partition(" ")
  if not pid:
    return "pid unknown"
  mine = " (this process)" if pid == str(os.getpid()) else ""
  return f"pid {pid}{mine}: {cmd}" if cmd else f"pid {pid}{mine}"


def _lock(path: str, fix: str) -> int:
  """Opens and ``flock``s ``path + ".lock"`` -> its fd; raises ``LockedError`` if held."""
  lock_path = path + ".lock"
  while True:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise LockedError(f"{path} is being appended to by another writer ({_holder(lock_path)}, "
                        f"lock file {lock_path}); {fix}") from None
    try:  # the holder before us may have removed the file between our open and our lock
      same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  os.ftruncate(fd, 0)
  os.write(fd, f"{os.getpid()} {' '.join(sys.argv)}\n".encode())
  return fd


@contextlib.contextmanager
def appender(path: str, fix: str = "wait for it to finish, or write to another file",
             fsync: bool = True):
  """Exclusive appending to ``path``: yields an object whose ``write(row)`` appends one line.

  Locks ``path + ".lock"`` (``fcntl.flock``; it records the holder's pid and command line),
  raising ``LockedError`` naming the holder and ``fix`` if another writer has it; then cuts a
  torn last line off (``repair``). The lock goes with the block, or with the process if it
  dies. ``fsync`` puts every row on disk before ``write`` returns."""
  lock = _lock(path, fix)
  w = None
  try:
    repair(path)
    w = _Writer(path, os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), fsync)
    yield w
  finally:
    if w is not None:
      os.close(w._fd)  # pylint: disable=protected-access
      w._fd = None  # pylint: disable=protected-access
    with contextlib.suppress(OSError):
      os.unlink(path + ".lock")  # while still holding it: see the inode check in _lock
    os.close(lock)
