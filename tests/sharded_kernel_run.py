"""The decode kernels (interpret mode) under shard_map on 8 host devices vs on one device.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_kernel_run.py OUT

Writes ``OUT`` (JSON): the max-abs difference of each kernel's sharded result from its
one-device result, per mesh. Used by ``tests/test_sharding.py`` (a fresh process: the host
device count is fixed when jax starts).
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np

from kvlab.lib import sharding
from kvlab.lib.quant.store import QuantStore
from kvlab.pallas_kernels import quantized_decode_attention as qda
from kvlab.pallas_kernels import sharded
from kvlab.pallas_kernels import sparse_decode_attention as sda


def main(out: str):
  rng = np.random.RandomState(0)
  b, k, g, h, s = 4, 2, 3, 32, 72
  q = jnp.asarray(rng.randn(b, k, g, h), jnp.float32)
  keys = jnp.asarray(rng.randn(b, k, s, h), jnp.float32)
  values = jnp.asarray(rng.randn(b, k, s, h), jnp.float32)
  lengths = rng.randint(0, s + 1, size=(b, k))
  lengths[0, 0] = 0
  pages = sda.to_pages(keys, values, lengths, 8)
  n_q = jnp.asarray(np.minimum(lengths, 64))
  store = QuantStore.build(keys[None, :, :, :64], values[None, :, :, :64],
                           jnp.zeros((1, b, k, 64), jnp.int32), n_q[None], k_bits=4, v_bits=4,
                           group=32, residual=0)
  quant = (store.k_codes[0], store.k_scale[0], store.k_zero[0], store.v_codes[0],
           store.v_scale[0], store.v_zero[0], n_q, keys[:, :, 64:], values[:, :, 64:],
           jnp.asarray(np.maximum(lengths - 64, 0)))
  one_q = np.asarray(qda.quantized_decode_attention(q, *quant, bits=4, group=32, block=32,
                                                    interpret=True))
  one_p = np.asarray(sda.paged_decode_attention(q, *pages, interpret=True))
  got = {}
  for spec in ("data:4,model:2", "data:2,model:4", "data:8"):
    mesh = sharding.make_mesh(spec)
    try:
      rows_heads = sharding.kernel_spec(mesh, b, k)
      sq = sharded.sharded_quantized_decode_attention(mesh, rows_heads, q, *quant, bits=4,
                                                      group=32, block=32, interpret=True)
      sp = sharded.sharded_paged_decode_attention(mesh, rows_heads, q, *pages, interpret=True)
      got[spec] = {"quantized": float(np.abs(np.asarray(sq) - one_q).max()),
                   "paged": float(np.abs(np.asarray(sp) - one_p).max()),
                   "out_sharding": str(sq.sharding.spec)}
    except ValueError as e:  # data:8 does not split 4 rows: the clear error is the result
      got[spec] = {"error": str(e)}
  with open(out, "w") as f:
    json.dump(got, f)


if __name__ == "__main__":
  main(sys.argv[1])
