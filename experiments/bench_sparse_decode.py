r"""Decode over a ragged AdaKV cache: the paged layout (the cache's own, ``lib.paged``) vs the
same kept tokens padded to the largest budget and masked (``adakv:layout=padded``).

  python -m experiments.bench_sparse_decode --length=4096 --ratio=0.25 \
      --out=results/bench_sparse_decode_cpu.json

The default model prefills ``--length`` tokens of offline text; AdaKV (``--ratio``) compresses the
cache once into each layout (the same kept tokens per layer and head: checked). Bytes come from
each compressed cache's leaves. Timed, paths alternating rep by rep (best of ``--reps``):

* one decode step of attention over all layers, the query of one new token:
  ``padded_xla`` (``chunk_attention`` over the padded cache), ``paged_xla`` (``chunk_attention``
  reading the pages through ``PagedStore.read``: a gather of whole pages per block),
  ``paged_pallas`` (``paged_decode_attention`` on ``PagedStore.kernel_inputs``; GPU/TPU only —
  interpret mode on CPU would time the interpreter);
* one whole decode step of the model (``lib.generate.decode_step``) on each layout, and on
  GPU/TPU also with ``attn_impl="pallas"`` (the model's decode reads the pages with the kernel).
"""

import platform
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from kvlab import models
from kvlab.models.decoder import make_apply_fn
from kvlab.lib import generate as gen
from kvlab.lib import methods
from kvlab.lib.attention import chunk_attention
from kvlab.lib.data.text import text_of_tokens
from kvlab.lib.provenance import device_description, write_result
from kvlab.lib.protocol import prefill_context
from kvlab.pallas_kernels import sparse_decode_attention as sda
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
flags.DEFINE_integer("length", 4096, "Prompt tokens prefilled before AdaKV compresses.")
flags.DEFINE_string("model", "smollm2-135m", "Model (named, HF directory or .gguf).")
flags.DEFINE_float("ratio", 0.25, "AdaKV kept fraction.")
flags.DEFINE_integer("page", 16, "Slots per page of the paged layout.")
flags.DEFINE_integer("reps", 20, "Timed repetitions (best is reported).")
flags.DEFINE_string("out", "results/bench_sparse_decode_cpu.json", "JSON output.")


def _time(fn, *args):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def main(argv):
  del argv
  launch_config.apply()
  lm = models.load(FLAGS.model, progress=False)
  c = lm.config
  ids = text_of_tokens(lm.tokenizer, FLAGS.length)
  paged_m = methods.make(f"adakv:page={FLAGS.page}", ratio=FLAGS.ratio)
  padded_m = methods.make("adakv:layout=padded", ratio=FLAGS.ratio)
  cache, obs, _ = prefill_context(lm.params, lm.apply_fn, [ids], num_layers=c.num_layers,
                                  kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                  observe=paged_m.observe, block=lm.attn_block_size)
  paged = methods.compress(paged_m, cache, obs, extra=8, block=lm.attn_block_size)
  padded = methods.compress(padded_m, cache, obs, extra=8, block=lm.attn_block_size)
  del cache
  lengths = np.asarray(padded.lengths)[:, 0, :]  # [L, K]
  np.testing.assert_array_equal(np.asarray(paged.quant.lengths)[:, 0, :], lengths)

  b, k, n, h = 1, c.num_kv_heads, c.num_heads, c.head_dim
  rng = np.random.RandomState(0)
  q = jnp.asarray(rng.randn(c.num_layers, b, 1, n, h), jnp.float32)
  kv_new = jnp.asarray(rng.randn(c.num_layers, 2, b, k, 1, h), jnp.float32)
  qpos = jnp.full((b, 1), FLAGS.length, jnp.int32)

  def attend_all(cache):
    def one(layer):
      return chunk_attention(q[layer], kv_new[layer, 0], kv_new[layer, 1], cache.keys,
                             cache.values, cache.positions, cache.lengths, qpos, layer=layer,
                             block_size=lm.attn_block_size, quant=cache.quant)
    return jnp.stack([one(layer) for layer in range(c.num_layers)])

  step_attn = jax.jit(attend_all)
  token = jnp.asarray([ids[-1]], jnp.int32)
  model = jax.jit(lambda params, cache: gen.decode_step(params, token, cache,
                                                        apply_fn=lm.apply_fn)[0])
  step_model = lambda cache: model(lm.params, cache)
  paths = {"padded_xla": (step_attn, padded), "paged_xla": (step_attn, paged),
           "model_step_padded": (step_model, padded), "model_step_paged": (step_model, paged)}
  on_accel = jax.default_backend() in ("gpu", "tpu")
  if on_accel:
    qk = q[:, :, 0].reshape(c.num_layers, b, k, n // k, h)
    kern = jax.jit(lambda store: jnp.stack([sda.paged_decode_attention(
        qk[layer], *store.kernel_inputs(layer)) for layer in range(c.num_layers)]))
    paths["paged_pallas"] = (kern, paged.quant)
    kern_fn = make_apply_fn(c, lm.dtype, lm.attn_block_size, attn_impl="pallas")
    model_k = jax.jit(lambda params, cache: gen.decode_step(params, token, cache,
                                                            apply_fn=kern_fn)[0])
    paths["model_step_paged_pallas"] = (lambda cache: model_k(lm.params, cache), paged)
  np.testing.assert_allclose(np.asarray(step_attn(paged)), np.asarray(step_attn(padded)),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(step_model(paged)), np.asarray(step_model(padded)),
                             rtol=1e-4, atol=1e-4)
  agree = {}
  if on_accel:  # the compiled kernels against the XLA paths (reported, not asserted)
    ref_logits = np.asarray(step_model(paged), np.float32)
    agree = {"model_step_pallas_vs_xla_max_abs_logit_diff": float(np.abs(
        np.asarray(model_k(lm.params, paged), np.float32) - ref_logits).max()),
             "logits_max_abs": float(np.abs(ref_logits).max()),
             "same_argmax": bool((np.asarray(model_k(lm.params, paged)).argmax(-1)
                                  == ref_logits.argmax(-1)).all())}
    print(agree)
  best = {name: float("inf") for name in paths}
  for _ in range(FLAGS.reps):
    for name, (fn, arg) in paths.items():
      best[name] = min(best[name], _time(fn, arg))
  bytes_of = {"padded": padded.trimmed().nbytes, "paged": paged.trimmed().nbytes}
  rows = []
  for name, t in best.items():
    layout = "padded" if "padded" in name else "paged"
    ref = best["model_step_padded" if name.startswith("model") else "padded_xla"]
    rows.append({"path": name, "seconds_per_step": t, "cache_bytes": bytes_of[layout],
                 "speed_vs_padded": ref / t})
    print(rows[-1])
  write_result(FLAGS.out, {
      "benchmark": "bench_sparse_decode", "device": device_description(), "model": FLAGS.model,
      "backend": jax.default_backend(), "host": platform.node(), "context": FLAGS.length,
      "ratio": FLAGS.ratio, "page": FLAGS.page, "kept_tokens": int(lengths.sum()),
      "padded_slots": int(padded.trimmed().capacity * lengths.size),
      "pool_pages": int(paged.quant.k_pages.shape[0]),
      "bytes_paged_over_padded": bytes_of["paged"] / bytes_of["padded"],
      "budget_min_max": [int(lengths.min()), int(lengths.max())], "rows": rows, **agree,
      "kernel_note": None if on_accel else "no accelerator: the Pallas kernel is tested in "
      "interpret mode only (tests/test_paged.py, tests/test_sparse_decode_kernel.py), not timed",
      "command": f"python -m experiments.bench_sparse_decode --model={FLAGS.model} "
                 f"--length={FLAGS.length} --ratio={FLAGS.ratio} --page={FLAGS.page} "
                 f"--out={FLAGS.out}"})


if __name__ == "__main__":
  app.run(main)
