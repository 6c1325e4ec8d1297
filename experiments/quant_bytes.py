r"""Bytes of a quantized cache (KIVI, KVQuant) vs a bf16 full cache, from the leaves.

  python -m experiments.quant_bytes --lengths=1024,4096,8192 --out=results/quant_bytes.json

The default model's cache shape (30 layers, 3 kv heads, head dim 64, batch 1) in bf16, filled
with random values, compressed by ``kivi`` (2-bit) and ``kivi4`` (group 32, 128-token residual)
and ``kvquant2/kvquant/kvquant4`` (2/3/4-bit LUT codes, 1 float16 outlier + uint8 index per
vector, float16 per-token value ranges; the committed calibration); bytes are
``KVCache.trimmed().nbytes`` (codes, scales/ranges, outliers, int32 positions, the bf16
residual, lengths, and KVQuant's shared LUTs and key ranges) over the full cache's ``nbytes``.
"""

import json

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib import methods
from kvlab.lib.cache import KVCache
from kvlab.lib.provenance import write_result
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
flags.DEFINE_list("lengths", ["1024", "4096", "8192"], "Cached tokens.")
flags.DEFINE_list("method", ["kivi", "kivi4", "kvquant2", "kvquant", "kvquant4"],
                  "Quantizers.")
flags.DEFINE_string("out", "results/quant_bytes.json", "JSON output.")


def main(argv):
  del argv
  launch_config.apply()
  rows = []
  for n in (int(x) for x in FLAGS.lengths):
    shape = (30, 1, 3, n, 64)
    rng = np.random.RandomState(0)
    full = KVCache(keys=jnp.asarray(rng.randn(*shape), jnp.bfloat16),
                   values=jnp.asarray(rng.randn(*shape), jnp.bfloat16),
                   positions=jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), shape[:4]),
                   lengths=jnp.full(shape[:3], n, jnp.int32),
                   next_position=jnp.full((1,), n, jnp.int32))
    for spec in FLAGS.method:
      q = methods.compress(methods.make(spec), full).trimmed()
      jax.block_until_ready(q)
      rows.append({"tokens": n, "method": spec, "bits": methods.make(spec).bits,
                   "full_bf16_bytes": full.nbytes, "quantized_bytes": q.nbytes,
                   "ratio_to_bf16": q.nbytes / full.nbytes})
      print(json.dumps(rows[-1]))
  write_result(FLAGS.out, {"benchmark": "quant_bytes", "kivi_group": 32, "kivi_residual": 128,
                           "rows": rows, "command": "python -m experiments.quant_bytes "
                           "--lengths=" + ",".join(FLAGS.lengths)})


if __name__ == "__main__":
  app.run(main)
