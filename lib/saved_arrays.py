"""A directory of named arrays + JSON metadata (orbax), for calibrations and trained bases.

``save(path, arrays, meta)`` writes it; ``load(path, fmt, what, how)`` reads it back with one
clear error each for a missing directory, a damaged one and one of another format (``meta``
must carry ``"format": fmt``). ``what`` names the contents in errors, ``how`` the command that
re-creates them. ``read_meta(path)`` reads the metadata alone (launchers check what an output
directory holds before replacing it).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def save(path: str, arrays: dict[str, Any], meta: dict) -> str:
  """Writes ``arrays`` (a nested dict of arrays) and ``meta`` to ``path`` (replaced if present);
  every process of a multi-host run must call it. Returns the absolute path."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    ckpt.save(path, ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                       meta=ocp.args.JsonSave(meta)), force=True)
  return path


def load(path: str, fmt: str, what: str, how: str) -> tuple[dict[str, Any], dict]:
  """``(arrays as numpy (nested dicts kept), meta)`` of a directory written by ``save``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no {what} at {path}: create it with {how}")
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
      got = ckpt.restore(path, ocp.args.Composite(arrays=ocp.args.StandardRestore(),
                                                  meta=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises several types for a damaged directory
    raise ValueError(f"{path} is not a readable {what} ({type(e).__name__}: {e}); re-create it "
                     f"with {how}") from e
  meta = dict(got["meta"])
  if meta.get("format") != fmt:
    raise ValueError(f"{path} is not a {what} (format {meta.get('format')!r}, expected "
                     f"{fmt!r})")
  as_np = lambda x: {k: as_np(v) for k, v in x.items()} if isinstance(x, dict) else np.asarray(x)
  return as_np(dict(got["arrays"])), meta


def read_meta(path: str) -> dict | None:
  """The JSON metadata of a directory written by ``save``, or None when ``path`` holds none."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  if not os.path.isdir(os.path.join(path, "meta")):
    return None
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
      got = ckpt.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))
  except Exception:  # pylint: disable=broad-except  # damaged or foreign: no metadata
    return None
  meta = got["meta"]
  return dict(meta) if isinstance(meta, dict) else None
