"""What produced a result: git revision and device (recorded in every results JSON)."""

from __future__ import annotations

import os
import subprocess


def git_rev() -> str | None:
  """Short HEAD revision of the kvlab checkout (with ``-dirty`` if modified), or None.
  ``KVLAB_GIT_REV``, when set, wins: a copy of the tree on a lent accelerator may carry a stale
  ``.git`` or none, and the launcher knows which revision it copied."""
  if os.environ.get("KVLAB_GIT_REV"):
    return os.environ["KVLAB_GIT_REV"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    rev = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                  stderr=subprocess.DEVNULL).strip()
    dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=root, text=True, stderr=subprocess.DEVNULL).strip()
    return rev + ("-dirty" if dirty else "")
  except Exception:  # pylint: disable=broad-except
    return None


def device_description() -> str:
  """What JAX computes on, in words: ``"gpu: NVIDIA H200 (1 device)"`` or, on CPU,
  ``"cpu: x86_64, 2 cores"``."""
  import platform  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  devs = jax.devices()
  if devs[0].platform == "cpu":
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
  return f"{devs[0].platform}: {devs[0].device_kind} ({len(devs)} device{'s' * (len(devs) > 1)})"


def write_result(path: str, result: dict) -> None:
  """Writes a benchmark's ``result`` as indented JSON to ``path`` (folders created; ``git``
  filled in if missing) and says where."""
  import json  # pylint: disable=g-import-not-at-top
  result.setdefault("git", git_rev())
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")
