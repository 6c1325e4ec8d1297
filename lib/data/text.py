"""Offline English text: the standard library's documentation rendered with ``pydoc``.

Real prose that ships with every Python install, so long-context runs need no download.
"""

from __future__ import annotations

import functools
import pydoc

# Modules with long, prose-heavy docstrings; rendered in this fixed order (deterministic).
_MODULES = ("json", "argparse", "collections", "itertools", "functools", "re", "datetime",
            "pathlib", "subprocess", "logging", "unittest", "threading", "asyncio", "typing",
            "dataclasses", "decimal", "fractions", "statistics", "textwrap", "string")


@functools.lru_cache(maxsize=1)
def stdlib_docs() -> str:
  """Returns the plain-text pydoc rendering of a fixed list of stdlib modules (~MBs)."""
  parts = []
  for name in _MODULES:
    try:
      mod = __import__(name)
    except ImportError:
      continue
    parts.append(pydoc.plain(pydoc.render_doc(mod, renderer=pydoc.plaintext)))
  return "\n\n".join(parts)


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
