"""What a result row measured: the run identity every evaluation row carries.

A row's numbers depend on more than its cell (task, length, method, ratio, sample): on the
weights (the model fingerprint, over every parameter), the dtype, the code (git revision) and
every flag that changes what is computed (haystack, depths, answer length, chunking, ...).
``identity`` gathers those; ``run_id`` hashes them. A resumed evaluation skips a row only when
its ``run`` equals the new run's, and refuses to add to a file that holds rows of another run
unless asked to append a new run (``check_resume``), so rows of different settings never mix
silently.

``setting_id`` is the same hash without the git revision and the answer batching: rows of one
setting measured by two commits are the same measurement for a report (it counts each sample
once), rows of two settings are not (the report shows them apart).

One evaluation over several haystacks or needle formats writes rows of several identities (one
per haystack x needle; ``check_resume`` takes them all). The needle format enters an identity
only when it is not the default (``needle_field``), so the identities of runs from before needle
formats existed, which all used the default, are unchanged.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kvlab.lib.eval.tasks import DEFAULT_NEEDLE

# Fields of an identity that a report may merge across (they do not change the measurement's
# meaning: the code revision, and how many cells are answered in one batch).
_NOT_SETTING = ("git", "batch_cells")


def needle_field(needle: str) -> dict:
  """``{}`` for the default needle format, else ``{"needle": needle}``: the identity field of a
  run's needle (absent for the default, as in identities written before it existed)."""
  return {} if needle == DEFAULT_NEEDLE else {"needle": needle}


def identity(**fields: Any) -> dict:
  """The run identity: ``fields`` (JSON-able: model fingerprint, dtype, git, flags), with
  lists kept in order and floats as given."""
  return json.loads(json.dumps(fields, sort_keys=True, default=str))


def _hash(d: dict) -> str:
  return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def run_id(ident: dict) -> str:
  """12 hex digits naming ``ident`` (every field)."""
  return _hash(ident)


def setting_id(ident: dict | None, without: tuple = ()) -> str | None:
  """12 hex digits naming ``ident`` without the git revision and answer batching (and the
  fields ``without``, e.g. ``("haystack", "needle")`` for what a run shares across them); None
  for rows written before identities existed."""
  if not ident:
    return None
  return _hash({k: v for k, v in ident.items() if k not in _NOT_SETTING + tuple(without)})


def differences(old: dict, new: dict) -> list[str]:
  """``["max_new_tokens: 48 -> 32", ...]``: the fields in which two identities differ."""
  out = []
  for k in sorted(set(old) | set(new)):
    if old.get(k) != new.get(k):
      out.append(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}")
  return out


def _short(v) -> str:
  s = json.dumps(v) if not isinstance(v, str) else v
  return s if len(s) <= 60 else s[:57] + "..."


def _but_haystack(ident: dict) -> dict:
  return {k: v for k, v in ident.items() if k not in ("haystack", "needle")}


class MixedRunsError(ValueError):
  """The output file holds rows of another run identity."""


def check_resume(rows: list[dict], ident: dict | list[dict], path: str, *,
                 append_run: bool) -> list[dict]:
  """Rows of ``rows`` (read from ``path``) that belong to the run ``ident`` (an identity, or
  the list of a run's identities, one per haystack x needle): the ones a resumed run may skip.

  Rows of this run's settings on other haystacks or needle formats (an earlier run over more of
  them: identities equal but for ``haystack`` and ``needle``) are neither skipped nor refused;
  the report keeps haystacks and needles apart. Raises ``MixedRunsError`` naming what differs
  when ``path`` holds rows of another identity (or rows from before identities were recorded)
  and ``append_run`` is False.
  """
  idents = [ident] if isinstance(ident, dict) else list(ident)
  rids = {run_id(i) for i in idents}
  siblings = [_but_haystack(i) for i in idents]
  same = [r for r in rows if r.get("run") in rids]
  others = [r for r in rows if r.get("run") not in rids
            and not (r.get("identity") and _but_haystack(r["identity"]) in siblings)]
  if others and not append_run:
    last = others[-1]
    old = last.get("identity")
    if old:
      nearest = min(idents, key=lambda i: len(differences(old, i)))
      diff = "; ".join(differences(old, nearest))
      what = f"rows of another run ({diff})"
    else:
      what = (f"{len(others)} rows written before runs were identified (model "
              f"{last.get('config', {}).get('model', '?')}, git {last.get('git', '?')})")
    raise MixedRunsError(
        f"{path} holds {what}: resuming would skip or mix them with this run's rows. Pass "
        "another --out, or --append_run to add this run's rows beside them (a report then "
        "shows the two settings apart)")
  return same
