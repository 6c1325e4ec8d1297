r"""The fused column-sum kernels alone, one layer-chunk, plain vs Keyformer's Gumbel sums.

  python -m experiments.bench_column_sums --out=results/bench_column_sums_gpu.json

Why: on an H200 at 4k (2026-11-27) H2O's observe hook with the kernel added 1.9 ms to a whole
prefill, Keyformer's 99 ms (``results/bench_compress_twin_bf16_kernel_h200.json``). This times
the pieces apart, at the default model's shape in one prefill chunk (3 kv heads x 3 query heads,
head dim 64, a 512-token chunk: 1536 query rows per kv head, against ``--slots`` keys, causal):

* ``column_plain`` / ``column_gumbel``: ``pallas_kernels.column_sums.column_sums`` without and
  with Keyformer's hashed noise (tau 1);
* ``row_plain`` / ``row_gumbel``: ``row_lse``, the row pass Keyformer takes first, split over
  the key blocks (its default partitions; ``row_*_p1``: one program walks every key block, the
  kernel before 2026-11-28);
* ``dense_*``: the jitted jnp references of the same (XLA, ``T x S`` in memory), for scale;
  each kernel row also gives its largest difference from them, relative to their largest value.

For each block shape in ``--blocks`` (``block_q x block_k``). Rows give seconds per call (best
of ``--reps``, paths alternated rep by rep) and nanoseconds per causal query-key pair. On a CPU
only ``--interpret`` runs the kernels (the interpreter's time, not a kernel's: a smoke test).
"""

import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib.gumbel import hash_salts, query_head_ids
from kvlab.lib.provenance import device_description, git_rev, write_result
from kvlab.pallas_kernels import column_sums as cs
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
flags.DEFINE_integer("kv_heads", 3, "kv heads (K).")
flags.DEFINE_integer("group", 3, "query heads per kv head (G).")
flags.DEFINE_integer("head_dim", 64, "head dim (H).")
flags.DEFINE_integer("chunk", 512, "query tokens in the chunk (rows per kv head: chunk x G).")
flags.DEFINE_integer("slots", 4096, "key slots: the chunk is the last `chunk` of them.")
flags.DEFINE_list("blocks", ["64x64"], "block_q x block_k shapes to time.")
flags.DEFINE_list("row_partitions", ["auto", "1"],
                  "row_lse split-K partitions to time ('auto': the kernel's default; other "
                  "than auto, the rows are named row_*_p<N>).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "q / keys dtype.")
flags.DEFINE_integer("reps", 20, "timed calls per path (best of).")
flags.DEFINE_bool("interpret", False, "run the kernels in interpret mode (CPU smoke test).")
flags.DEFINE_string("out", "results/bench_column_sums_gpu.json", "JSON output.")


def _inputs(k, g, h, t, s, dtype, seed=0):
  """q ``[1, K, G*T, H]``, keys ``[1, K, S, H]``, positions, all-valid slots, group-mean
  weights, and Keyformer's salts (layer 0, seed 0) for the chunk's rows."""
  if t > s:
    raise ValueError(f"--chunk ({t}) must be at most --slots ({s})")
  rng = np.random.RandomState(seed)
  q = jnp.asarray(rng.randn(1, k, g * t, h), dtype)
  keys = jnp.asarray(rng.randn(1, k, s, h), dtype)
  pos = np.arange(s - t, s, dtype=np.int32)
  q_pos = jnp.asarray(np.broadcast_to(np.tile(pos, g), (1, k, g * t)))
  k_pos = jnp.asarray(np.broadcast_to(np.arange(s, dtype=np.int32), (1, k, s)))
  k_ok = jnp.ones((1, k, s), bool)
  w = jnp.full((1, k, g * t), 1.0 / g, jnp.float32)
  heads = jnp.repeat(query_head_ids(k, g)[None], t, axis=-1)  # [1, K, G*T], row r: head r // T
  salts = hash_salts(0, 0, heads, q_pos, k_pos)
  return q, keys, q_pos, k_pos, k_ok, w, salts


def _lses(q, keys, q_pos, k_pos, k_ok, w, salts):
  """The rows' reference normalisers ``(plain, gumbel)`` the column passes take."""
  del w
  return (cs.row_lse_reference(q, q_pos, keys, k_pos, k_ok),
          cs.row_lse_reference(q, q_pos, keys, k_pos, k_ok, tau=1.0, salts=salts))


def _paths(q, keys, q_pos, k_pos, k_ok, w, salts, lses, block_q, block_k, interpret,
           row_partitions=("auto",)):
  """name -> jitted zero-argument call of the kernels."""
  kw = dict(block_q=block_q, block_k=block_k, interpret=interpret)
  g1 = dict(tau=1.0, salts=salts)
  lse_plain, lse_gumbel = lses
  paths = {
      "column_plain": lambda: cs.column_sums(q, lse_plain, q_pos, w, keys, k_pos, k_ok, **kw),
      "column_gumbel": lambda: cs.column_sums(q, lse_gumbel, q_pos, w, keys, k_pos, k_ok,
                                              **g1, **kw),
  }
  for p in row_partitions:
    rk = dict(kw, partitions=None if p == "auto" else int(p))
    tag = "" if p == "auto" else f"_p{int(p)}"
    paths["row_plain" + tag] = lambda rk=rk: cs.row_lse(q, q_pos, keys, k_pos, k_ok, **rk)
    paths["row_gumbel" + tag] = lambda rk=rk: cs.row_lse(q, q_pos, keys, k_pos, k_ok, **g1,
                                                         **rk)
  return {name: jax.jit(f) for name, f in paths.items()}


def _dense_paths(q, keys, q_pos, k_pos, k_ok, w, salts, lses):
  """name -> jitted zero-argument call of the dense references."""
  g1 = dict(tau=1.0, salts=salts)
  lse, lse_gumbel = lses
  return {name: jax.jit(f) for name, f in {
      "dense_column_plain": lambda: cs.column_sums_reference(q, lse, q_pos, w, keys, k_pos, k_ok),
      "dense_column_gumbel": lambda: cs.column_sums_reference(q, lse_gumbel, q_pos, w, keys,
                                                              k_pos, k_ok, **g1),
      "dense_row_gumbel": lambda: cs.row_lse_reference(q, q_pos, keys, k_pos, k_ok, **g1),
  }.items()}


def _time_all(paths, reps):
  """Best-of-``reps`` seconds per path, paths alternated rep by rep (after one compile call)."""
  for f in paths.values():
    jax.block_until_ready(f())
  best = {name: float("inf") for name in paths}
  for _ in range(reps):
    for name, f in paths.items():
      t = time.perf_counter()
      jax.block_until_ready(f())
      best[name] = min(best[name], time.perf_counter() - t)
  return best


def main(argv):
  del argv
  launch_config.apply()
  k, g, h, t, s = FLAGS.kv_heads, FLAGS.group, FLAGS.head_dim, FLAGS.chunk, FLAGS.slots
  args = _inputs(k, g, h, t, s, getattr(jnp, FLAGS.dtype))
  lses = _lses(*args)  # once: every block shape and the dense paths take the same
  pairs = k * g * (t * (s - t) + t * (t + 1) // 2)  # causal query-key pairs
  rows = []
  timed = {}
  for spec in FLAGS.blocks:
    bq, bk = (int(v) for v in spec.lower().split("x"))
    for name, f in _paths(*args, lses, bq, bk, FLAGS.interpret, FLAGS.row_partitions).items():
      timed[(name, spec)] = f
  for name, f in _dense_paths(*args, lses).items():
    timed[(name, None)] = f
  best = _time_all(timed, FLAGS.reps)
  outs = {key: np.asarray(f(), np.float64) for key, f in timed.items()}
  dense = {"column_plain": "dense_column_plain", "column_gumbel": "dense_column_gumbel",
           "row_gumbel": "dense_row_gumbel"}
  for (name, spec), sec in best.items():
    row = {"path": name, "blocks": spec, "seconds": sec, "ns_per_pair": sec / pairs * 1e9}
    if name.startswith("row_") and name.rpartition("_p")[2].isdigit():
      row["partitions"] = int(name.rpartition("_p")[2])
    base = name.rpartition("_p")[0] if "partitions" in row else name
    if base in dense:  # what was timed computes what the reference does
      ref = outs[(dense[base], None)]
      row["max_rel_diff_vs_dense"] = float(np.max(np.abs(outs[(name, spec)] - ref))
                                           / max(np.max(np.abs(ref)), 1e-30))
    rows.append(row)
    print(row)
  res = {"benchmark": "bench_column_sums", "shape": dict(kv_heads=k, group=g, head_dim=h,
                                                         chunk=t, slots=s),
         "causal_pairs": pairs, "dtype": FLAGS.dtype, "reps": FLAGS.reps,
         "interpret": FLAGS.interpret, "rows": rows, "git": git_rev(),
         "device": device_description(), "jax": jax.__version__,
         "command": " ".join(["python -m experiments.bench_column_sums"] + sys.argv[1:])}
  write_result(FLAGS.out, res)


if __name__ == "__main__":
  app.run(main)
