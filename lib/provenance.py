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
