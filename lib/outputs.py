"""Where launchers write, and what they refuse to overwrite.

* A launcher's default output is under ``runs/`` (git-ignored), named after the model
  (``default_out("calibration", "kvquant_" + slug)``): the committed ``results/`` are written
  only when ``--out`` names them.
* An output records the identity of what made it: the model (name, source path, fingerprint)
  and every setting that shapes the result (``identity``). Writing into an output made with
  another identity, or resuming a run from one, is refused with every difference listed
  (``check_replace``); the same identity may overwrite (or resume).
"""

from __future__ import annotations

import json
import os
from typing import Any

RUNS = "runs"


def default_out(*parts: str) -> str:
  """``runs/<parts...>`` (relative to the working directory)."""
  return os.path.join(RUNS, *parts)


def identity(model: str, source: str, fingerprint: str, **settings: Any) -> dict:
  """``{"model", "source", "fingerprint", "settings"}``, JSON-normalised (tuples as lists)."""
  return json.loads(json.dumps({"model": model, "source": source, "fingerprint": fingerprint,
                                "settings": settings}, sort_keys=True, default=str))


def _model(ident: dict) -> str:
  name, src = ident.get("model") or "?", ident.get("source")
  return f"{name} ({src})" if src and src != name else name


def changes(old: dict, new: dict) -> list[str]:
  """One line per difference of two identities: the model (when the fingerprints differ) and
  each setting, ``"--name: old -> new"``. Name and source alone do not count."""
  out = []
  if old.get("fingerprint") != new.get("fingerprint"):
    out.append(f"model: {_model(old)}, fingerprint {old.get('fingerprint')} -> {_model(new)}, "
               f"fingerprint {new.get('fingerprint')}")
  o, n = old.get("settings") or {}, new.get("settings") or {}
  for k in sorted(set(o) | set(n)):
    if o.get(k) != n.get(k):
      out.append(f"--{k}: {o.get(k, 'unset')} -> {n.get(k, 'unset')}")
  return out


def check_replace(out: str, old: dict | None, new: dict, *, what: str, overwrite: bool,
                  resume: bool = False, flag: str = "--out") -> None:
  """Raises ``ValueError`` unless ``new`` may be written into (or resumed from) ``out``.

  old: the identity recorded in ``out``; None when ``out`` holds something without one (a
  foreign file, or an output written before identities were recorded). Pass only when ``out``
  exists. overwrite: the launcher's ``--overwrite``. resume: word the fix for a resumable run.
  flag: the launcher's flag that names ``out``.
  """
  if overwrite:
    return
  fix = ("re-run with the same flags to resume it, " if resume else "") + (
      f"pass another {flag}, or --overwrite to replace it")
  if old is None:
    raise ValueError(f"{out} exists and does not record what made it (not a {what}, or one "
                     f"written before kvlab recorded run identities): {fix}")
  diff = changes(old, new)
  if diff:
    other_model = old.get("fingerprint") != new.get("fingerprint")
    how = " and ".join(["for another model"] * other_model
                       + ["with other settings"] * (len(diff) > other_model))
    raise ValueError(f"{out} holds a {what} made {how}:\n  " + "\n  ".join(diff) + f"\n{fix}")


def read_json(path: str) -> dict | None:
  """The JSON object in ``path``, or None when it is missing or not a JSON object."""
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, ValueError):
    return None
  return d if isinstance(d, dict) else None


def is_empty(path: str) -> bool:
  """True when nothing is at ``path`` or it is an empty directory."""
  return not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))
