r"""Decode-attention time per step vs context length: full cache vs 4-/2-bit KIVI-layout caches.

  python -m experiments.bench_decode --lengths=1024,4096,16384,32768 \
      --out=results/bench_decode_cpu.json

One decode step of GQA attention for one layer (the default model's shape: 3 kv heads x 3 query
heads each, head dim 64, batch 1 — flags change it). Paths, timed alternately rep by rep so noise
hits all of them, best of ``--reps``:

* ``full_bf16`` / ``full_f32``: exact attention over a full cache (XLA);
* ``q4_xla`` / ``q2_xla``: the jnp reference of ``pallas_kernels.quantized_decode_attention``
  (packed codes, group 32, 128-token full-precision residual) — dequantizes in XLA;
* ``q4_pallas`` / ``q2_pallas``: the Pallas kernel (``q*_pallas_p<n>``: with ``n`` split-K
  partitions, ``--kernel_partitions``; ``..._bf16``: bf16 dot operands,
  ``--kernel_dot_dtypes``), only on GPU/TPU (interpret mode on CPU
  measures the interpreter, not the kernel).

Each row gives seconds per step, bytes of the cache read (from the leaves) and bytes / second;
on an accelerator also that rate as a fraction of the device's peak memory bandwidth
(``peak_fraction``: the vendor's figure for the device kind, ``--peak_gb_s`` to set it).
The issue's GPU targets: ``q*_pallas`` at >= 0.8 of peak and >= 3x ``full_bf16`` at 32k.
"""

import json
import math
import os
import platform
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib.device_peaks import peak_gb_s
from kvlab.lib.provenance import git_rev, write_result
from kvlab.lib.quant import uniform
from kvlab.pallas_kernels.quantized_decode_attention import (quantized_decode_attention,
                                                       quantized_decode_attention_reference)
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192", "16384", "32768"], "Context.")
flags.DEFINE_integer("batch", 1, "Rows.")
flags.DEFINE_integer("kv_heads", 3, "KV heads.")
flags.DEFINE_integer("group_heads", 3, "Query heads per kv head.")
flags.DEFINE_integer("head_dim", 64, "Head dim.")
flags.DEFINE_integer("group", 32, "Quantization group.")
flags.DEFINE_integer("residual", 128, "Full-precision residual tokens.")
flags.DEFINE_integer("reps", 20, "Timed repetitions (best is reported).")
flags.DEFINE_string("out", "results/bench_decode_cpu.json", "JSON output.")
flags.DEFINE_list("kernel_partitions", ["auto"], "Split-K partitions of the kernel to time, each "
                  "a path: 'auto' (the kernel's default, path q*_pallas) or a number n (path "
                  "q*_pallas_p<n>; 1 is the one-program-per-head kernel).")
flags.DEFINE_list("kernel_dot_dtypes", ["float32"], "Operand dtypes of the kernel's dots to "
                  "time: float32 (exact; paths q*_pallas...) and/or bfloat16 (tensor cores; "
                  "paths q*_pallas..._bf16).")
flags.DEFINE_float("peak_gb_s", 0.0, "Peak memory bandwidth of the device in GB/s (0: from "
                   "PEAK_GB_S by device kind; none on CPU).")

@jax.jit
def full_attention(q, k, v, n):
  """``q [B, K, G, H]``, ``k, v [B, K, S, H]``, ``n [B, K]`` valid -> ``[B, K, G, H]``."""
  logits = jnp.einsum("bkgh,bksh->bkgs", q.astype(k.dtype), k,
                      preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
  valid = jnp.arange(k.shape[2]) < n[..., None]
  p = jax.nn.softmax(jnp.where(valid[:, :, None], logits, -1e30), -1)
  return jnp.einsum("bkgs,bksh->bkgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def _quantized_case(rng, b, k, s, h, bits, group, r):
  keys = jnp.asarray(rng.randn(b, k, s, h).astype(np.float32))
  vals = jnp.asarray(rng.randn(b, k, s, h).astype(np.float32))
  kq = uniform.quantize(keys, bits, group, -2)
  vq = uniform.quantize(vals, bits, group, -1)
  args = (kq.codes, kq.scale.astype(jnp.bfloat16), kq.zero.astype(jnp.bfloat16), vq.codes,
          vq.scale.astype(jnp.bfloat16), vq.zero.astype(jnp.bfloat16),
          jnp.full((b, k), s, jnp.int32),
          jnp.asarray(rng.randn(b, k, r, h), jnp.bfloat16),
          jnp.asarray(rng.randn(b, k, r, h), jnp.bfloat16), jnp.full((b, k), r, jnp.int32))
  return args, sum(x.nbytes for x in args[:6] + args[7:9])


def main(argv):
  del argv
  launch_config.apply()
  rng = np.random.RandomState(0)
  b, k, g, h = FLAGS.batch, FLAGS.kv_heads, FLAGS.group_heads, FLAGS.head_dim
  accel = jax.devices()[0].platform != "cpu"
  kind = str(jax.devices()[0].device_kind)
  peak = peak_gb_s(kind, FLAGS.peak_gb_s) if accel else None
  rows = []
  for s in (int(x) for x in FLAGS.lengths):
    q = jnp.asarray(rng.randn(b, k, g, h).astype(np.float32))
    n = jnp.full((b, k), s, jnp.int32)
    paths = {}
    for dt, name in ((jnp.bfloat16, "full_bf16"), (jnp.float32, "full_f32")):
      kk = jnp.asarray(rng.randn(b, k, s, h), dt)
      vv = jnp.asarray(rng.randn(b, k, s, h), dt)
      paths[name] = (full_attention, (q, kk, vv, n), kk.nbytes + vv.nbytes)
    sq = s - FLAGS.residual  # the quantized part; the residual holds the newest tokens
    for bits in (4, 2):
      args, nbytes = _quantized_case(rng, b, k, sq, h, bits, FLAGS.group, FLAGS.residual)
      kw = dict(bits=bits, group=FLAGS.group, block=math.gcd(512, sq))
      ref = jax.jit(lambda *a, kw=kw: quantized_decode_attention_reference(*a, **kw))
      paths[f"q{bits}_xla"] = (ref, (q,) + args, nbytes)
      if accel:
        for parts in FLAGS.kernel_partitions:
          for dots in FLAGS.kernel_dot_dtypes:
            kp = dict(kw, partitions=None if parts == "auto" else int(parts),
                      dot_dtype=getattr(jnp, dots))
            ker = lambda *a, kp=kp: quantized_decode_attention(*a, **kp)
            name = (f"q{bits}_pallas" + ("" if parts == "auto" else f"_p{parts}")
                    + ("" if dots == "float32" else "_bf16"))
            paths[name] = (ker, (q,) + args, nbytes)
    for name, (fn, args, _) in paths.items():
      jax.block_until_ready(fn(*args))
    best = {name: [] for name in paths}
    for _ in range(FLAGS.reps):  # alternate paths rep by rep
      for name, (fn, args, _) in paths.items():
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best[name].append(time.perf_counter() - t)
    base = min(best["full_bf16"])
    for name, (_, _, nbytes) in paths.items():
      t = min(best[name])
      rows.append({"context": s, "path": name, "seconds_per_step": t, "cache_bytes_read": nbytes,
                   "gb_per_s": nbytes / t / 1e9, "speedup_vs_full_bf16": base / t,
                   "peak_fraction": None if peak is None else nbytes / t / 1e9 / peak})
      print(json.dumps(rows[-1]))
  res = {"benchmark": "bench_decode", "device": kind, "peak_gb_s": peak,
         "platform": platform.platform(), "cpu_count": os.cpu_count(),
         "load_avg_at_end": os.getloadavg(), "shape": dict(batch=b, kv_heads=k, group_heads=g,
                                                           head_dim=h, group=FLAGS.group,
                                                           residual=FLAGS.residual),
         "rows": rows, "git": git_rev(),
         "command": " ".join(["python -m experiments.bench_decode"] + sys.argv[1:])}
  write_result(FLAGS.out, res)


if __name__ == "__main__":
  app.run(main)
