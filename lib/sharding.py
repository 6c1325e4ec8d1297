"""One device mesh with axes ``('data', 'model')`` and the placement of params and caches on it.

Letters: L layers, B batch, K kv heads, N query heads, S slots, H head dim, D width, F MLP width,
V vocab.

* params, by name (Megatron style): column-parallel ``wq, wk, wv, w_gate, w_up`` (and their
  biases) and ``lm_head`` split their output axis over ``model``; row-parallel ``wo, w_down``
  split their input axis; norms and the embedding are replicated. A weight whose split would
  cut a head (``N``, ``K``) or the MLP width (``F``) into unequal parts is replicated instead,
  and the reason is logged once.
* caches: batch on ``data``, kv heads on ``model`` (``[L, B, K, S, H]`` -> ``P(None, 'data',
  'model')``); kv heads that do not divide the model axis are replicated (logged). Quantized
  stores follow the same rule for their per-slot leaves; their shared calibration leaves (LUTs,
  key ranges, RoPE frequencies) are replicated.

``jax.jit`` then partitions prefill, compression and decode by propagation from these inputs
(the functions are the same on one device or many); ``constrain_cache`` pins a cache's layout
inside a jitted function.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "model")
_log = logging.getLogger(__name__)
_SAID: set = set()


def parse_mesh(spec: str) -> dict[str, int]:
  """``"data:4,model:2"`` -> ``{"data": 4, "model": 2}`` (a missing axis is 1)."""
  out = {a: 1 for a in AXES}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, size = part.partition(":")
    if name not in AXES or not size.isdigit() or int(size) < 1:
      raise ValueError(f"bad mesh {spec!r}: write axis:size pairs over {AXES}, e.g. "
                       "--mesh=data:4,model:2")
    out[name] = int(size)
  return out


def make_mesh(spec: str | dict[str, int] = "", devices=None) -> Mesh:
  """A ``('data', 'model')`` mesh over ``devices`` (default: all). ``spec`` as ``parse_mesh``;
  empty means ``data: <all devices>``. Raises if the sizes do not multiply to the device
  count."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec) if isinstance(spec, str) else {**{a: 1 for a in AXES}, **spec}
  if not spec:
    sizes = {"data": len(devices), "model": 1}
  n = math.prod(sizes.values())
  if n != len(devices):
    raise ValueError(f"mesh {sizes} needs {n} devices, there are {len(devices)} "
                     f"({devices[0].platform}): pick sizes whose product is {len(devices)}"
                     " (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N)")
  grid = np.asarray(devices, dtype=object).reshape(sizes["data"], sizes["model"])
  return Mesh(grid, AXES)


def _note(reason: str) -> None:
  if reason not in _SAID:
    _SAID.add(reason)
    _log.warning("sharding: %s", reason)


def splits(n: int, m: int, what: str) -> bool:
  """Whether ``n`` units (heads, channels) split evenly over ``m`` model shards (logs why not)."""
  if m == 1:
    return False
  if n % m:
    _note(f"{what} ({n}) do not divide the model axis ({m}): replicated")
    return False
  return True


# ---- params ---------------------------------------------------------------------------------

_COLUMN = {"wq": "q", "bq": "q", "wk": "kv", "bk": "kv", "wv": "kv", "bv": "kv",
           "w_gate": "f", "b_gate": "f", "w_up": "f", "b_up": "f", "lm_head": "v"}
_ROW = {"wo": "q", "w_down": "f"}


def param_specs(params, cfg, mesh: Mesh):
  """``PartitionSpec`` per parameter (same tree), by the rules in the module docstring."""
  m = mesh.shape["model"]
  units = {"q": (cfg.num_heads, "query heads"), "kv": (cfg.num_kv_heads, "kv heads"),
           "f": (cfg.intermediate_size, "MLP channels"), "v": (cfg.vocab_size, "vocab rows")}

  def spec(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    kind = _COLUMN.get(name) or _ROW.get(name)
    if kind is None or not splits(*units[kind][:1], m, units[kind][1]):
      return P()
    axes = [None] * x.ndim
    axes[-1 if name in _COLUMN else -2] = "model"
    return P(*axes)

  return jax.tree_util.tree_map_with_path(spec, params)


def shard_params(params, cfg, mesh: Mesh):
  """``params`` placed on ``mesh`` by ``param_specs``."""
  specs = param_specs(params, cfg, mesh)
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)


# ---- caches ---------------------------------------------------------------------------------

def check_batch(batch: int, mesh: Mesh) -> None:
  """Raises a ValueError naming the fix unless ``batch`` splits evenly over the
  mesh's ``data`` axis."""
  d = mesh.shape["data"]
  if batch % d:
    raise ValueError(f"batch {batch} does not split over the data axis ({d}): use a batch that "
                     f"is a multiple of {d}, or a mesh with data:{math.gcd(batch, d)}")


def kernel_spec(mesh: Mesh, batch: int, kv_heads: int) -> P:
  """``P(data, model)`` over the leading (row, kv head) axes of a decode kernel's inputs
  (``pallas_kernels.sharded``), replicating what does not divide (logged)."""
  check_batch(batch, mesh)
  data = "data" if mesh.shape["data"] > 1 else None
  heads = "model" if splits(kv_heads, mesh.shape["model"], "kv heads of the kernel") else None
  return P(data, heads)


def cache_specs(cache, mesh: Mesh):
  """``PartitionSpec`` per leaf of a ``KVCache`` (any quantized store included), same tree."""
  check_batch(cache.batch, mesh)
  b, k = cache.batch, cache.kv_heads
  data = "data" if mesh.shape["data"] > 1 else None
  heads = "model" if splits(k, mesh.shape["model"], "kv heads of the cache") else None

  def spec(x):
    # per-(layer, row, head) leaves: [L, B, K, ...]; next_position: [B]; the rest is shared
    if x.ndim >= 3 and x.shape[1] == b and x.shape[2] == k:
      return P(None, data, heads, *([None] * (x.ndim - 3)))
    if x.ndim == 1 and x.shape[0] == b and x is cache.next_position:
      return P(data)
    return P()

  specs = jax.tree.map(spec, cache)
  store = cache.quant
  if store is not None and hasattr(store, "row_leaves"):
    # leaves with a batch axis but no per-head one (xKV's factors mix heads): rows on data
    rows = {name: P(None, data, *([None] * (getattr(store, name).ndim - 2)))
            for name in store.row_leaves}
    specs = specs.replace(quant=specs.quant.replace(**rows))
  return specs


def shard_cache(cache, mesh: Mesh):
  """``cache`` placed on ``mesh`` by ``cache_specs``."""
  specs = cache_specs(cache, mesh)
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), cache, specs)


def constrain_cache(cache, mesh: Mesh):
  """Inside ``jit``: pins every cache leaf to its ``cache_specs`` layout."""
  specs = cache_specs(cache, mesh)
  return jax.tree.map(
      lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, s)), cache, specs)


def replicated(x: Any, mesh: Mesh):
  """``x`` (any pytree) copied to every device of ``mesh``."""
  return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P())), x)


def describe(mesh: Mesh) -> str:
  """``"data:4,model:2 (8 cpu devices)"``."""
  n = mesh.devices.size
  return (f"data:{mesh.shape['data']},model:{mesh.shape['model']} "
          f"({n} {mesh.devices.flat[0].platform} devices)")


def place_model(lm, spec: str):
  """For launchers' ``--mesh``: ``lm`` (a ``models.LanguageModel``) with params sharded over the
  mesh ``spec`` (empty: unchanged, one device). Caches the launcher then creates are laid out by
  propagation (batch on ``data``, kv heads on ``model``). Returns ``(lm, mesh or None)``."""
  if not spec:
    return lm, None
  mesh = make_mesh(spec)
  from kvlab.lib import fingerprint  # pylint: disable=g-import-not-at-top
  old = lm.params
  lm.params = shard_params(lm.params, lm.config, mesh)
  fingerprint.carry(old, lm.params, lm.config)  # the same values: no second hash
  _log.warning("mesh %s", describe(mesh))
  return lm, mesh


def to_host(x) -> np.ndarray:
  """``x`` as a numpy array on this host, also when it is spread over several processes
  (multi-host: gathered from all of them). For the host-level sizing reads (cache lengths)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
