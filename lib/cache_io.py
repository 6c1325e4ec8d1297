"""Saving and loading a ``KVCache`` (any layout: dense, compressed, paged (ragged AdaKV /
PyramidKV), KIVI- or KVQuant-quantized, xKV low-rank, ThinK channel-pruned, MatryoshkaKV,
MiniCache)
with orbax, so a long document's compressed cache is computed once and reused by later runs.

A saved cache is an orbax checkpoint directory holding the leaves (written shard by shard from
however many devices and processes held them) and JSON metadata: the layout (which optional
parts are present, a quantized store's type and static settings), every leaf's shape and dtype,
and the caller's ``meta`` (model fingerprint, method, prompt hash, ...). Loading lays the leaves
out on the mesh asked for (``lib.sharding.cache_specs``) or on one device, whatever the mesh
they were saved from.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from kvlab.lib.cache import KVCache

FORMAT = "kvlab-cache/1"


def _stores():
  """Every stored-part type a cache may carry, by class name."""
  # pylint: disable=g-import-not-at-top
  from kvlab.lib.lowrank.channels import ChannelStore
  from kvlab.lib.lowrank.merged import MergedStore
  from kvlab.lib.lowrank.projected import ProjectedStore
  from kvlab.lib.lowrank.store import LowRankStore
  from kvlab.lib.paged import PagedStore
  from kvlab.lib.quant.kvquant_store import KVQuantStore
  from kvlab.lib.quant.store import QuantStore
  return {c.__name__: c for c in (QuantStore, KVQuantStore, LowRankStore, ChannelStore,
                                  MergedStore, ProjectedStore, PagedStore)}


def _fields(obj) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(array fields, static fields)`` of a flax struct dataclass."""
  arrays, static = {}, {}
  for f in dataclasses.fields(obj):
    v = getattr(obj, f.name)
    if f.metadata.get("pytree_node", True):
      if v is not None:
        arrays[f.name] = v
    else:
      static[f.name] = v
  return arrays, static


def save_cache(cache: KVCache, path: str, meta: dict | None = None) -> str:
  """Writes ``cache`` to the directory ``path`` (replaced if present); every process of a
  multi-host run must call it. Returns the absolute path."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  arrays, _ = _fields(cache)
  layout: dict[str, Any] = {"quant": None,  # per-layer windows of a hybrid model (or None)
                            "windows": None if cache.windows is None else list(cache.windows)}
  if cache.quant is not None:
    q_arrays, q_static = _fields(cache.quant)
    arrays["quant"] = q_arrays
    layout["quant"] = {"type": type(cache.quant).__name__, "static": q_static}
  shapes = jax.tree.map(lambda x: [list(x.shape), str(x.dtype)], arrays)
  info = {"format": FORMAT, "layout": layout, "shapes": shapes, "meta": meta or {}}
  path = os.path.abspath(path)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    ckpt.save(path, ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                       meta=ocp.args.JsonSave(info)), force=True)
  return path


def read_meta(path: str) -> dict:
  """The metadata of a saved cache (layout, shapes, the caller's ``meta``)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no saved cache at {path}")
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
      info = ckpt.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # orbax raises several types for a damaged directory
    raise ValueError(f"{path} is not a readable saved cache ({type(e).__name__}: {e})") from e
  if info.get("format") != FORMAT:
    raise ValueError(f"{path} is not a kvlab cache (format {info.get('format')!r})")
  return info


def load_cache(path: str, mesh=None) -> tuple[KVCache, dict]:
  """Reads a cache saved by ``save_cache`` onto ``mesh`` (``lib.sharding`` layout) or, with
  ``mesh=None``, onto the first local device. Returns ``(cache, the caller's meta)``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  info = read_meta(path)
  shapes = info["shapes"]
  struct = lambda s: jax.ShapeDtypeStruct(tuple(s[0]), jnp.dtype(s[1]))
  is_shape = lambda s: isinstance(s, list) and len(s) == 2 and isinstance(s[1], str)
  abstract = jax.tree.map(struct, shapes, is_leaf=is_shape)
  skeleton = _assemble(abstract, info["layout"])
  if mesh is None:
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: dev, skeleton)
  else:
    from kvlab.lib import sharding  # pylint: disable=g-import-not-at-top
    specs = sharding.cache_specs(skeleton, mesh)
    shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        skeleton, shardings)
  arrays_target, _ = _fields(target)
  if target.quant is not None:
    arrays_target["quant"] = _fields(target.quant)[0]
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    got = ckpt.restore(os.path.abspath(path), ocp.args.Composite(
        arrays=ocp.args.StandardRestore(arrays_target)))["arrays"]
  return _assemble(got, info["layout"]), info["meta"]


def _assemble(arrays: dict, layout: dict) -> KVCache:
  arrays = dict(arrays)
  q = arrays.pop("quant", None)
  quant = None
  if layout["quant"] is not None:
    cls = _stores()[layout["quant"]["type"]]
    static = {k: tuple(v) if isinstance(v, list) else v  # JSON lists back to (hashable) tuples
              for k, v in layout["quant"]["static"].items()}
    quant = cls(**q, **static)
  windows = layout.get("windows")
  return KVCache(**arrays, quant=quant, windows=None if windows is None else tuple(windows))
