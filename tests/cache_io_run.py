"""Loads saved caches onto a mesh of 8 host devices, checks them, and saves them from there.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/cache_io_run.py IN OUT MESH

For every cache directory in IN: load on MESH and on one device, assert equal leaves and that the
keys are spread over the mesh, then save the mesh-laid-out cache to OUT/<name>. Used by
``tests/test_cache_io.py``.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from kvlab.lib import cache_io, sharding


def main(src, dst, mesh_spec):
  mesh = sharding.make_mesh(mesh_spec)
  for name in sorted(os.listdir(src)):
    on_mesh, meta = cache_io.load_cache(os.path.join(src, name), mesh)
    one, _ = cache_io.load_cache(os.path.join(src, name))
    for a, b in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(one)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(on_mesh.keys.sharding.device_set) == 8, on_mesh.keys.sharding
    cache_io.save_cache(on_mesh, os.path.join(dst, name), {**meta, "via": mesh_spec})


if __name__ == "__main__":
  main(*sys.argv[1:4])
