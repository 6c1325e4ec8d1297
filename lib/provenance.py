"""What produced a result: git revision (recorded in every results JSON)."""

from __future__ import annotations

import os
import subprocess


def git_rev() -> str | None:
  """Short HEAD revision of the kvlab checkout (with ``-dirty`` if modified), or None."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    rev = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                  stderr=subprocess.DEVNULL).strip()
    dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=root, text=True, stderr=subprocess.DEVNULL).strip()
    return rev + ("-dirty" if dirty else "")
  except Exception:  # pylint: disable=broad-except
    return None


def write_result(path: str, result: dict) -> None:
  """Writes a benchmark's ``result`` as indented JSON to ``path`` (folders created; ``git``
  filled in if missing) and says where."""
  import json  # pylint: disable=g-import-not-at-top
  result.setdefault("git", git_rev())
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")
