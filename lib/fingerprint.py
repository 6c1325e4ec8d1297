"""A model's fingerprint: a hash of its config and of every parameter's bytes.

Calibrations and trained artifacts (KVQuant, kvzip_heads tables, MatryoshkaKV projections)
record the fingerprint of the model they were made on; loading one for another model raises.

* Every leaf is hashed as bfloat16 (with its tree path and shape): a float32 and a bfloat16
  load of the same checkpoint agree (the loaders round once, float32 -> bfloat16, the same
  round-to-nearest-even as this cast). A float16 load rounds differently and does not agree.
* ``"w1-"`` + 20 hex digits. The old format (16 hex digits, no prefix) hashed the config and a
  4 x 32 slice of the embedding only, so it could not tell models with the same embedding
  apart: ``check`` refuses it and asks for a new calibration.
* Computed once per params tree: a memo keyed on the leaves (held by weak references, so an
  id reused after garbage collection never matches). SmolLM2-135M on 2 CPU cores: 0.4 s
  (float32 params), 0.25 s (bfloat16).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref

import jax
import jax.numpy as jnp
import numpy as np

PREFIX = "w1-"

# id tuple of the leaves -> (weak references to them, config JSON, fingerprint)
_MEMO: dict[tuple, tuple[list, str, str]] = {}


# Fields ModelConfig / RopeConfig gained after fingerprints were first committed (Gemma 3, YaRN,
# LongRoPE), with their defaults: left out of the hash while at those defaults, so every earlier
# model keeps its fingerprint (committed calibrations and resumable result files record it).
_ADDED_LATER = {
    "norm_offset": 0.0, "sandwich_norms": False, "mlp_act": "silu", "embed_scale": False,
    "query_scale": None, "final_logit_softcap": None, "layer_types": None, "rope_local": None,
    "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True, "mscale": None,
    "mscale_all_dim": None, "attention_factor": None, "short_factor": None, "long_factor": None,
}


def _without_later_defaults(d):
  """``d`` (a config as nested dicts) without the ``_ADDED_LATER`` fields at their defaults."""
  if not isinstance(d, dict):
    return d
  return {k: _without_later_defaults(v) for k, v in d.items()
          if not (k in _ADDED_LATER and v == _ADDED_LATER[k])}


def _config_json(config) -> str:
  d = (_without_later_defaults(dataclasses.asdict(config)) if dataclasses.is_dataclass(config)
       else str(config))
  return json.dumps(d, sort_keys=True, default=str)


def _host(x) -> np.ndarray:
  """``x`` as numpy on this host (gathered when spread over several processes)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _leaf_bytes(x) -> np.ndarray:
  """A leaf as a flat uint8 view of its bfloat16 values (non-float leaves: their own bytes)."""
  a = _host(x)
  if np.issubdtype(a.dtype, np.floating) or a.dtype == jnp.bfloat16:
    a = a.astype(jnp.bfloat16)
  return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _compute(cfg_json: str, params) -> str:
  h = hashlib.sha256(cfg_json.encode())
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                           key=lambda pl: jax.tree_util.keystr(pl[0])):
    h.update(f"|{jax.tree_util.keystr(path)}{tuple(np.shape(leaf))}|".encode())
    h.update(memoryview(_leaf_bytes(leaf)))
  return PREFIX + h.hexdigest()[:20]


def model_fingerprint(config, params) -> str:
  """``"w1-" + 20 hex digits`` over ``config`` and every leaf of ``params`` (as bfloat16)."""
  cfg_json = _config_json(config)
  leaves = jax.tree_util.tree_leaves(params)
  # Only immutable leaves (jax arrays) are memoised: a numpy leaf may change in place.
  if not leaves or not all(isinstance(x, jax.Array) for x in leaves):
    return _compute(cfg_json, params)
  key = tuple(id(x) for x in leaves)
  hit = _MEMO.get(key)
  if hit is not None and hit[1] == cfg_json and all(r() is x for r, x in zip(hit[0], leaves)):
    return hit[2]
  fp = _compute(cfg_json, params)
  for k in [k for k, (refs, _, _) in _MEMO.items() if any(r() is None for r in refs)]:
    del _MEMO[k]  # entries of collected params
  _MEMO[key] = ([weakref.ref(x) for x in leaves], cfg_json, fp)
  return fp


def carry(old_params, new_params, config) -> None:
  """Records for ``new_params`` (e.g. ``old_params`` re-laid out on a mesh: the same values)
  the fingerprint already known for ``old_params``, so it is not hashed again."""
  cfg_json = _config_json(config)
  old = jax.tree_util.tree_leaves(old_params)
  hit = _MEMO.get(tuple(id(x) for x in old))
  new = jax.tree_util.tree_leaves(new_params)
  if (hit is None or hit[1] != cfg_json or not all(r() is x for r, x in zip(hit[0], old))
      or not new or not all(isinstance(x, jax.Array) for x in new)):
    return
  _MEMO[tuple(id(x) for x in new)] = ([weakref.ref(x) for x in new], cfg_json, hit[2])


def is_current(fp: str | None) -> bool:
  """Whether ``fp`` is of this module's format (not the old embedding-slice one)."""
  return isinstance(fp, str) and fp.startswith(PREFIX)


def check_format(stored: str | None, *, artifact: str, made_for: str, what: str,
                 fix: str) -> None:
  """Raises ``ValueError`` when ``stored`` (an artifact's recorded fingerprint) is of the old
  format, which cannot be compared with this one. artifact: what was made (``"KVQuant
  calibration /path"``); made_for: the model it records; what: the model it is used with;
  fix: the command that makes one for this model."""
  if not is_current(stored):
    raise ValueError(
        f"{artifact} records a model fingerprint of the old format ({stored!r}, made for "
        f"{made_for}; it hashed only the config and a slice of the embedding, so it cannot "
        f"tell models apart): re-calibrate it for {what}: {fix}")


def check(stored: str | None, current: str, *, artifact: str, made_for: str, what: str,
          fix: str) -> None:
  """Raises ``ValueError`` unless ``stored`` equals ``current`` (the model's fingerprint);
  arguments as ``check_format``."""
  if stored == current:
    return
  check_format(stored, artifact=artifact, made_for=made_for, what=what, fix=fix)
  raise ValueError(f"{artifact} was made on {made_for} (fingerprint {stored}), not on "
                   f"{what} (fingerprint {current}): {fix}")


def describe(meta: dict, name_key: str = "model") -> str:
  """``"name (source path)"`` of the model an artifact's ``meta`` records."""
  name, src = meta.get(name_key) or "an unnamed model", meta.get("source")
  return f"{name} ({src})" if src else name
