"""Needle-task haystacks: filler text that ships with CPython, so every machine with the same
Python builds the same contexts, offline.

  noise      RULER's repeated sentences (``lib.eval.tasks.NOISE``)
  docs       pydoc text of 20 stdlib modules (``lib.data.text.stdlib_docs``)
  code       the source of 17 pure-Python stdlib modules, read from their files (none of the
             modules docs renders, so the two share no docstrings)
  license    the stdlib's LICENSE.txt (CPython's history and licence terms)
  changelog  IDLE's change logs shipped in ``idlelib`` (NEWS.txt, NEWS2x.txt, HISTORY.txt,
             ChangeLog)

The file haystacks are read from the stdlib folder (``sysconfig.get_path("stdlib")``) in a fixed
order, once per process. Code is cut into lines, prose into sentences. A context longer than a
text wraps around to its start (LICENSE.txt holds about 3.5k tokens).
"""

from __future__ import annotations

import functools
import os
import random
import re
import sysconfig

HAYSTACKS = ("noise", "docs", "code", "license", "changelog")
# Haystacks read from files of the stdlib folder: name -> files, relative to that folder.
FILES = {
    "code": ("difflib.py", "configparser.py", "optparse.py", "pickle.py", "shlex.py", "heapq.py",
             "bisect.py", "calendar.py", "csv.py", "gettext.py", "glob.py", "fnmatch.py",
             "pprint.py", "ftplib.py", "smtplib.py", "tokenize.py", "ast.py"),
    "license": ("LICENSE.txt",),
    "changelog": ("idlelib/NEWS.txt", "idlelib/NEWS2x.txt", "idlelib/HISTORY.txt",
                  "idlelib/ChangeLog"),
}
# Haystacks cut into lines (the others into sentences).
LINES = ("code",)

# A sentence ends at ., ! or ? followed by whitespace, or at a blank line (headings, list items
# and changelog entries often end without a full stop).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n[ \t]*\n\s*")


class HaystackUnavailable(ValueError):
  """A haystack whose files this Python does not ship."""


def stdlib_dir() -> str:
  """The folder of the standard library's ``.py`` files (the base install's, in a venv)."""
  return sysconfig.get_path("stdlib")


def unavailable(kind: str) -> str | None:
  """None when haystack ``kind`` can be built here; otherwise why not (an unknown name, or the
  files this Python lacks), naming the haystack."""
  if kind not in HAYSTACKS:
    return f"unknown haystack {kind!r}; known: {', '.join(HAYSTACKS)}"
  if kind not in FILES:
    return None
  root = stdlib_dir()
  absent = [f for f in FILES[kind] if not os.path.isfile(os.path.join(root, f))]
  if absent:
    return (f"haystack {kind!r} needs {', '.join(absent)} in the standard library folder "
            f"{root}, which this Python does not ship (some distributions strip or split "
            "them); use another haystack")
  return None


@functools.lru_cache(maxsize=None)
def text(kind: str) -> str:
  """The whole text of a file haystack (``code``, ``license``, ``changelog``): its files in
  order, newlines normalised to ``\\n``, joined by a blank line. Raises
  ``HaystackUnavailable`` naming the haystack when a file is missing."""
  if kind not in FILES:
    raise ValueError(f"haystack {kind!r} is not read from files; file haystacks: "
                     f"{', '.join(FILES)}")
  why = unavailable(kind)
  if why:
    raise HaystackUnavailable(why)
  parts = []
  for name in FILES[kind]:
    with open(os.path.join(stdlib_dir(), name), encoding="utf-8", errors="replace") as f:
      parts.append(f.read().strip("\n"))
  return "\n\n".join(parts) + "\n\n"


def chunk(kind: str, rng: random.Random, n_chars: int) -> str:
  """``n_chars`` characters of a file haystack from an offset drawn from ``rng`` (the offset
  does not depend on ``n_chars``, so a longer chunk extends a shorter one), wrapping around to
  the start; code starts at a line's start."""
  t = text(kind)
  start = rng.randrange(len(t))
  if kind in LINES:
    start = t.rfind("\n", 0, start) + 1
  reps = (start + n_chars) // len(t) + 1
  return (t * reps)[start:start + n_chars]


def pieces(kind: str, chunk_text: str) -> list[str]:
  """``chunk_text`` cut into lines (code) or sentences (prose), each with the whitespace after
  it: ``"".join(pieces(kind, t)) == t``."""
  if kind in LINES:
    return chunk_text.splitlines(keepends=True)
  out, pos = [], 0
  for m in _SENTENCE_END.finditer(chunk_text):
    out.append(chunk_text[pos:m.end()])
    pos = m.end()
  if pos < len(chunk_text):
    out.append(chunk_text[pos:])
  return out
