"""Offline English text: the standard library's documentation rendered with ``pydoc``.

Real prose that ships with every Python install, so long-context runs need no download.
"""

from __future__ import annotations

import functools
import subprocess
import sys

# Modules with long, prose-heavy docstrings; rendered in this fixed order (deterministic).
_MODULES = ("json", "argparse", "collections", "itertools", "functools", "re", "datetime",
            "pathlib", "subprocess", "logging", "unittest", "threading", "asyncio", "typing",
            "dataclasses", "decimal", "fractions", "statistics", "textwrap", "string")


# Rendered in a fresh interpreter (``-I -S``: no site, no environment), so the text does not
# depend on the caller: pydoc prints live state (logging's handlers and stderr stream, hooks a
# test runner installed, ``__slotnames__`` caches) and object addresses, which ASLR changes in
# every process; the addresses are removed too.
_RENDER = r"""
import pydoc, re, sys
parts = []
for name in sys.argv[1:]:
  try:
    mod = __import__(name)
  except ImportError:
    continue
  parts.append(pydoc.plain(pydoc.render_doc(mod, renderer=pydoc.plaintext)))
text = re.sub(r" at 0x[0-9a-fA-F]+", "", "\n\n".join(parts))
sys.stdout.buffer.write(text.encode("utf-8"))
"""


@functools.lru_cache(maxsize=1)
def stdlib_docs() -> str:
  """Returns the plain-text pydoc rendering of a fixed list of stdlib modules (~0.85 MB): the
  same on every run of one Python version, whatever the calling process imported or set up."""
  out = subprocess.run([sys.executable, "-I", "-S", "-c", _RENDER, *_MODULES],
                       capture_output=True, check=True, timeout=600)
  return out.stdout.decode("utf-8")


def text_of_tokens(tokenizer, n_tokens: int, offset_chars: int = 0) -> list[int]:
  """First ``n_tokens`` token ids of the stdlib docs (starting at a character offset)."""
  text = stdlib_docs()[offset_chars:]
  ids: list[int] = []
  step = max(4 * n_tokens, 2000)
  pos = 0
  while len(ids) < n_tokens:
    if pos >= len(text):
      raise ValueError(f"stdlib docs hold fewer than {n_tokens} tokens")
    pos += step
    ids = tokenizer.encode(text[:pos], add_special_tokens=False)
  return ids[:n_tokens]
