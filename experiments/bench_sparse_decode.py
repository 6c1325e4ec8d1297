r"""Decode attention over a ragged AdaKV cache: paged (only each head's own pages) vs padded to
the largest budget and masked (what the dense cache stores today).

  python -m experiments.bench_sparse_decode --length=4096 --ratio=0.25 \
      --out=results/bench_sparse_decode_cpu.json

The per-(layer, head) budgets are real: the default model prefills ``--length`` tokens of offline
text and AdaKV (``--ratio``) compresses the cache; its kept lengths ``[L, 1, K]`` shape both
layouts (random keys/values, the default model's 3 kv heads x 3 query heads, head dim 64). One
decode step of attention over all layers, paths timed alternately rep by rep (best of
``--reps``), bytes of the cache from the leaves:

* ``padded_xla``: every head padded to the largest budget of its layer, masked (XLA);
* ``paged_xla``: ``to_pages`` pool + the jnp reference of ``paged_decode_attention`` (XLA gather);
* ``paged_pallas``: the Pallas kernel — only on GPU/TPU (interpret mode on CPU times the
  interpreter, not the kernel).
"""

import platform
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import models
from lib import methods
from lib.data.text import text_of_tokens
from lib.provenance import write_result
from lib.protocol import prefill_context
from pallas_kernels import sparse_decode_attention as sda

FLAGS = flags.FLAGS
flags.DEFINE_integer("length", 4096, "Prompt tokens prefilled before AdaKV compresses.")
flags.DEFINE_float("ratio", 0.25, "AdaKV kept fraction.")
flags.DEFINE_integer("page", 64, "Slots per page.")
flags.DEFINE_integer("reps", 20, "Timed repetitions (best is reported).")
flags.DEFINE_string("out", "results/bench_sparse_decode_cpu.json", "JSON output.")


def adakv_lengths(length: int, ratio: float) -> np.ndarray:
  """Kept tokens ``[L, K]`` per layer and head of AdaKV on the default model."""
  lm = models.load("smollm2-135m", progress=False)
  c = lm.config
  ids = text_of_tokens(lm.tokenizer, length)
  m = methods.make("adakv", ratio=ratio)
  cache, obs, _ = prefill_context(lm.params, lm.apply_fn, [ids], num_layers=c.num_layers,
                                  kv_heads=c.num_kv_heads, head_dim=c.head_dim, observe=m.observe)
  small = methods.compress(m, cache, obs)
  return np.asarray(small.lengths)[:, 0, :]


def _time(fn, *args):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def main(argv):
  del argv
  lengths = adakv_lengths(FLAGS.length, FLAGS.ratio)  # [L, K]
  n_layers, k = lengths.shape
  g, h, page = 3, 64, FLAGS.page
  rng = np.random.RandomState(0)
  s_max = int(lengths.max())
  keys = jnp.asarray(rng.randn(n_layers, 1, k, s_max, h), jnp.bfloat16)
  vals = jnp.asarray(rng.randn(n_layers, 1, k, s_max, h), jnp.bfloat16)
  q = jnp.asarray(rng.randn(n_layers, 1, k, g, h), jnp.float32)
  n = jnp.asarray(lengths[:, None, :], jnp.int32)  # [L, 1, K]
  # padded: per layer, the layer's largest budget (as compress allocates it)
  padded = [(keys[i, :, :, :int(lengths[i].max())], vals[i, :, :, :int(lengths[i].max())])
            for i in range(n_layers)]
  paged = [sda.to_pages(keys[i], vals[i], lengths[i][None], page) for i in range(n_layers)]
  padded_bytes = sum(a.nbytes + b.nbytes for a, b in padded)
  paged_bytes = sum(kp.nbytes + vp.nbytes + t.nbytes + v.nbytes for kp, vp, t, v in paged)

  @jax.jit
  def step_padded(q, padded, n):
    outs = []
    for i, (kk, vv) in enumerate(padded):
      valid = jnp.arange(kk.shape[2]) < n[i][..., None]
      s = jnp.einsum("bkgh,bksh->bkgs", q[i].astype(kk.dtype), kk,
                     preferred_element_type=jnp.float32) / np.sqrt(h)
      p = jax.nn.softmax(jnp.where(valid[:, :, None], s, -1e30), -1)
      outs.append(jnp.einsum("bkgs,bksh->bkgh", p.astype(vv.dtype), vv,
                             preferred_element_type=jnp.float32))
    return jnp.stack(outs)

  @jax.jit
  def step_paged(q, paged):
    return jnp.stack([sda.paged_decode_attention_reference(q[i], *paged[i])
                      for i in range(n_layers)])

  paths = {"padded_xla": (step_padded, (q, padded, n)), "paged_xla": (step_paged, (q, paged))}
  on_accel = jax.default_backend() in ("gpu", "tpu")
  if on_accel:
    kern = jax.jit(lambda q, paged: jnp.stack([sda.paged_decode_attention(q[i], *paged[i])
                                               for i in range(n_layers)]))
    paths["paged_pallas"] = (kern, (q, paged))
  ref = np.asarray(step_padded(q, padded, n))
  for name, (fn, args) in paths.items():  # compile, and check they agree
    np.testing.assert_allclose(np.asarray(fn(*args)), ref, rtol=2e-2, atol=2e-2, err_msg=name)
  best = {name: float("inf") for name in paths}
  for _ in range(FLAGS.reps):
    for name, (fn, args) in paths.items():
      best[name] = min(best[name], _time(fn, *args))
  kept = int(lengths.sum())
  rows = [{"path": name, "seconds_per_step": t,
           "cache_bytes": padded_bytes if name == "padded_xla" else paged_bytes,
           "speed_vs_padded": best["padded_xla"] / t} for name, t in best.items()]
  for r in rows:
    print(r)
  write_result(FLAGS.out, {
      "benchmark": "bench_sparse_decode", "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(), "host": platform.node(), "context": FLAGS.length,
      "ratio": FLAGS.ratio, "page": page, "kept_tokens": kept,
      "padded_slots": int(sum(lengths[i].max() * k for i in range(n_layers))),
      "budget_min_max": [int(lengths.min()), int(lengths.max())], "rows": rows,
      "kernel_note": None if on_accel else "no accelerator: the Pallas kernel is tested in "
      "interpret mode only and not timed",
      "command": f"python -m experiments.bench_sparse_decode --length={FLAGS.length} "
                 f"--ratio={FLAGS.ratio}"})


if __name__ == "__main__":
  app.run(main)
