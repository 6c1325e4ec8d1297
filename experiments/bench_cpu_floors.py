r"""What bounds two of issue 3's targets on this machine, each part timed alone, alternating reps.

  python -m experiments.bench_cpu_floors --out=results/bench_cpu_floors_cpu.json

* ``attention``: the default model's attention only (30 layers x 9 query / 3 kv heads, dim 64), one
  chunk of 512 queries over ``--cached`` keys: hook-free; keeping the probabilities for H2O
  (``return_probs``) with their column sums (``_kept_column_sums``, what the h2o hook runs); and
  keeping them without reading them. How much of H2O's overhead is writing ``T x S`` to memory.
* ``weights``: one decode step must read every weight. A jitted read of the default model's
  fp32 bytes (135 M parameters), and batch-1 GEMVs over a third of them as 30 stacked layers
  and as 30 separate per-layer arrays picked by ``lax.switch``: the memory floor of a decode
  step, and how near XLA's single-row matmuls come to it in each layout.
* ``moments``: expected_attention's observe hook (``query_moments``) alone over 8 chunks x 30
  layers of 512 queries: the part of its overhead that is its arithmetic.
* ``decode``: the default model's jitted decode loop, tokens per second from 33 vs 1 generated
  (512 prompt tokens cached), beside the same loop on a model of the same structure (30 layers,
  9 / 3 heads, tied embedding) with tiny widths (D 72, H 8, F 96, V 512): what a token costs that
  is not reading weights (the loop's XLA CPU operations, each dispatched in turn); and with those
  widths but the model's head dim (64): its attention over the cache and the cache's update too.
* ``prefill`` (not in the default parts): a ``--prefill_length`` prefill of the default model
  and of the same two twins, and lone GEMMs of its MLP shapes: where a 2k prefill's time goes.
* ``kvpress_ceiling``: with ``--vs_kvpress`` (a ``bench_vs_kvpress`` JSON from this machine),
  the best ratio kvlab could reach against kvpress if its decode ran at the stacked-GEMV floor
  above (every weight read once a token) and its prefill + compress stayed as measured there;
  ``ceiling_at_read_floor``: the same with every weight read at the plain read's rate.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from kvlab.lib.attention import LayerInputs, chunk_attention
from kvlab.lib.cache import KVCache
from kvlab.lib.methods import accumulated
from kvlab.lib.methods.expected_attention import query_moments
from kvlab.lib.provenance import device_description, git_rev, write_result
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
flags.DEFINE_list("cached", ["1536", "3584"], "Cached keys before the chunk (chunks 3 and 7 of 4k).")
flags.DEFINE_integer("reps", 5, "Timed repetitions per variant (median reported).")
flags.DEFINE_string("vs_kvpress", "results/bench_vs_kvpress_maskbias_cpu.json",
                    "bench_vs_kvpress JSON (this machine) for the ceiling; empty: skip it.")
flags.DEFINE_list("parts", ["attention", "weights", "moments", "decode"],
                  "Parts to time (the ceiling needs weights).")
flags.DEFINE_integer("prefill_length", 2048, "Prompt tokens of the prefill part.")
flags.DEFINE_string("out", "results/bench_cpu_floors_cpu.json", "JSON output.")

L, B, N, K, H, T, S = 30, 1, 9, 3, 64, 512, 4096  # SmolLM2-135M's heads, a 4k cache, 512 chunk
G = N // K
PARAMS = 135_000_000  # the default model's parameters (fp32 bytes = 4x)


def _median_times(fns: dict, args, reps: int) -> dict:
  """Compiles each ``fns[name](*args)`` once, then times them in turn ``reps`` times."""
  for f in fns.values():
    jax.block_until_ready(f(*args))
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(v) for name, v in times.items()}


def _attention_case(cached: int):
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  cache = KVCache(keys=jax.random.normal(ks[0], (L, B, K, S, H)),
                  values=jax.random.normal(ks[1], (L, B, K, S, H)),
                  positions=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (L, B, K, S)),
                  lengths=jnp.full((L, B, K), cached, jnp.int32),
                  next_position=jnp.full((B,), cached, jnp.int32))
  q = jax.random.normal(ks[2], (B, T, N, H))
  k_new = jax.random.normal(ks[3], (B, K, T, H))
  v_new = jax.random.normal(ks[4], (B, K, T, H))
  return cache, q, k_new, v_new, cached + jnp.arange(T, dtype=jnp.int32)[None]


def attention(cached: int, reps: int) -> dict:
  """Seconds for 30 layers of one chunk's attention: hook-free, kept + column sums, kept only."""

  def run(mode, cache, q, k_new, v_new, qpos):
    def layer(l, acc):
      out = chunk_attention(q, k_new, v_new, cache.keys, cache.values, cache.positions,
                            cache.lengths, qpos, layer=l, return_lse=True,
                            return_probs=mode != "hook_free")
      if mode == "hook_free":
        return acc + out[0].sum()
      o, lse, kept = out
      if mode == "kept_only":  # keep the buffer alive without reading it all
        return acc + o.sum() + kept.blocks_p[kept.n_blocks - 1, 0, 0, 0, 0, 0]
      x = LayerInputs(q, k_new, v_new, q, k_new, qpos, jnp.ones((B, T), bool),
                      jnp.ones((H // 2,)), lse, kept)
      return acc + o.sum() + accumulated._kept_column_sums(l, x, cache, kept).sum()  # pylint: disable=protected-access
    return jax.lax.fori_loop(0, L, layer, jnp.float32(0))

  modes = ("hook_free", "kept_with_column_sums", "kept_only")
  fns = {m: jax.jit(lambda *a, m=m: run(m, *a)) for m in modes}
  t = _median_times(fns, _attention_case(cached), reps)
  base = t["hook_free"]
  return {"cached_keys": cached, "seconds": t,
          "overhead_fraction": {m: t[m] / base - 1 for m in modes[1:]}}


def weights(reps: int) -> dict:
  """A read of the model's fp32 bytes, and batch-1 GEMVs over 30 [576, 4608] layers: stacked
  ``[L, ...]`` and sliced at ``[l]`` in the layer loop (kvlab's layout: XLA CPU copies the slice
  before its dot), and as 30 separate arrays that ``lax.switch`` picks in the same loop (no
  copy: each branch's dot reads its own buffer). Each layer's input is the last one's output,
  so the dots run in turn as a decode step's do."""
  flat = jnp.ones((PARAMS,), jnp.float32)
  w = jax.random.normal(jax.random.PRNGKey(0), (L, 576, 3 * 1536), jnp.float32)
  per_layer = tuple(jnp.array(w[l]) for l in range(L))  # 30 buffers of their own
  x = jnp.ones((1, 576))
  chain = lambda h, y: h + 1e-3 * y[:, :576]
  gemv = jax.jit(lambda x, w: jax.lax.fori_loop(0, L, lambda l, h: chain(h, h @ w[l]), x))
  read = jax.jit(lambda x, w: jax.lax.fori_loop(0, L, lambda l, a: a + w[l].sum(), 0.0))

  def switched(x, *ws):
    pick = lambda l, h: jax.lax.switch(l, [lambda h, w=w: h @ w for w in ws], h)
    return jax.lax.fori_loop(0, L, lambda l, h: chain(h, pick(l, h)), x)

  t = _median_times({"gemv": gemv, "read": read}, (x, w), reps)
  t_switch = _median_times({"switch": jax.jit(switched)}, (x, *per_layer), reps)["switch"]
  t_all = _median_times({"read_model": jax.jit(lambda f: f.sum())}, (flat,), reps)["read_model"]
  gbs = lambda sec: w.nbytes / sec / 1e9
  return {"model_fp32_bytes": PARAMS * 4, "read_model_s": t_all,
          "read_gb_per_s": PARAMS * 4 / t_all / 1e9, "stacked_bytes": w.nbytes,
          "stacked_read_s": t["read"], "stacked_gemv_s": t["gemv"],
          "gemv_over_read": t["gemv"] / t["read"], "stacked_gemv_gb_per_s": gbs(t["gemv"]),
          "per_layer_switch_gemv_s": t_switch, "per_layer_switch_gb_per_s": gbs(t_switch),
          "stacked_over_per_layer": t["gemv"] / t_switch}


def moments(reps: int) -> dict:
  """expected_attention's ``query_moments`` hook over 8 chunks x 30 layers of 512 queries."""
  hook = query_moments(4)
  q = jax.random.normal(jax.random.PRNGKey(1), (L, B, T, N, H))

  def run(q):
    def layer(l, acc):
      x = LayerInputs(q[l], None, None, q[l], None, 512 + jnp.arange(T)[None],
                      jnp.ones((B, T), bool), jnp.ones((H // 2,)))
      return acc + hook(l, x, None)["s2"].sum()
    return jax.lax.fori_loop(0, L, layer, jnp.float32(0))

  per_chunk = _median_times({"hook": jax.jit(run)}, (q,), reps)["hook"]
  return {"chunks": 8, "layers": L, "seconds_per_chunk": per_chunk, "seconds": 8 * per_chunk}


def decode(reps: int) -> dict:
  """Seconds per decoded token of the default model and of its tiny-width twin (``decode``
  above), each from the difference of 33- and 1-token ``decode_loop`` runs."""
  from kvlab import models  # pylint: disable=g-import-not-at-top
  from kvlab.lib import generate as gen  # pylint: disable=g-import-not-at-top

  lm, twins = _twins()
  tokens = jnp.arange(100, 612, dtype=jnp.int32)[None] % 512  # 512 prompt tokens
  lengths = jnp.array([512], jnp.int32)
  def run(params, cache, logits, apply_fn, n):  # the loop donates its cache: give it a copy
    return gen.decode_loop(params, jax.tree.map(jnp.copy, cache), logits,
                           jax.random.PRNGKey(0), apply_fn=apply_fn, max_new_tokens=n)[0]

  fns = {}
  for name, (cfg, params, apply_fn) in {"model": (lm.config, lm.params, lm.apply_fn),
                                        **twins}.items():
    cache = models.LanguageModel(cfg, params, None, apply_fn).new_cache(1, 512 + 40)
    logits, cache, _ = gen.prefill(params, tokens, lengths, cache, apply_fn=apply_fn,
                                   chunk_size=512)
    for n in (1, 33):
      fns[f"{name}/{n}"] = functools.partial(run, params, cache, logits, apply_fn, n)
  t = _median_times(fns, (), reps)
  per = {a: (t[f"{a}/33"] - t[f"{a}/1"]) / 32 for a in ("model", *twins)}
  return {"cached_tokens": 512, "seconds": t, "s_per_token": per,
          "tiny_widths_config": {"hidden_size": 72, "intermediate_size": 96, "head_dim": 8,
                                 "vocab_size": 512}}


def _twins():
  """``(the default model, {name: (config, params, apply_fn)})``: its twins of the same
  structure with tiny widths, and with tiny widths but the model's head dim (``decode``)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from kvlab import models  # pylint: disable=g-import-not-at-top
  from kvlab.models.decoder import init_params, make_apply_fn  # pylint: disable=g-import-not-at-top

  lm = models.load("smollm2-135m", progress=False)
  tiny_cfg = dataclasses.replace(lm.config, hidden_size=72, intermediate_size=96, head_dim=8,
                                 vocab_size=512,
                                 rope=dataclasses.replace(lm.config.rope, head_dim=8))
  # ... and with the model's own head dim: its attention and KV cache, tiny weights otherwise
  heads_cfg = dataclasses.replace(tiny_cfg, head_dim=lm.config.head_dim, rope=lm.config.rope)
  return lm, {name: (cfg, init_params(cfg, jax.random.PRNGKey(0)),
                     make_apply_fn(cfg, jnp.float32, lm.attn_block_size, "xla"))
              for name, cfg in (("tiny_widths", tiny_cfg),
                                ("tiny_widths_model_heads", heads_cfg))}


def prefill(length: int, reps: int) -> dict:
  """Seconds of a ``length``-token prefill (chunks of 512) of the default model and of its two
  twins (``decode``), and the GFLOP/s of lone GEMMs of the model's MLP shapes: how much of the
  prefill is attention (heads twin minus tiny twin: the head-dim-sized dots; tiny twin: the
  ``T x S`` softmax work and the rest of the structure) and how near its GEMMs run to a lone
  GEMM's rate."""
  from kvlab import models  # pylint: disable=g-import-not-at-top
  from kvlab.lib import generate as gen  # pylint: disable=g-import-not-at-top

  lm, twins = _twins()
  tokens = (jnp.arange(length, dtype=jnp.int32)[None] * 7 + 3) % 512
  lengths = jnp.array([length], jnp.int32)

  def run(params, cache, apply_fn):  # prefill donates nothing, but give it a fresh cache
    return gen.prefill(params, tokens, lengths, jax.tree.map(jnp.copy, cache),
                       apply_fn=apply_fn, chunk_size=512)[0]

  fns = {}
  for name, (cfg, params, apply_fn) in {"model": (lm.config, lm.params, lm.apply_fn),
                                        **twins}.items():
    cache = models.LanguageModel(cfg, params, None, apply_fn).new_cache(1, length)
    fns[name] = functools.partial(run, params, cache, apply_fn)
  t = _median_times(fns, (), reps)
  d, f = lm.config.hidden_size, lm.config.intermediate_size
  gemms = {}
  for m, k, n in ((512, d, f), (512, f, d)):  # a chunk through gate / up, and down
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    sec = _median_times({"gemm": jax.jit(lambda a, b: a @ b)}, (a, b), max(reps, 20))["gemm"]
    gemms[f"{m}x{k}x{n}"] = 2 * m * k * n / sec / 1e9
  return {"prompt_tokens": length, "chunk": 512, "seconds": t,
          "attention_dots_s": t["tiny_widths_model_heads"] - t["tiny_widths"],
          "rest_s": t["model"] - t["tiny_widths_model_heads"],
          "lone_gemm_gflop_per_s": gemms}


def kvpress_ceiling(path: str, floors: dict) -> list:
  """Per summary row of a ``bench_vs_kvpress`` JSON: kvpress seconds over kvlab's measured
  prefill + compress plus its new tokens at each ``floors[name]`` seconds a token, as
  ``"ceiling"`` (the first floor) and ``"ceiling_at_<name>"`` (the others)."""
  with open(path) as f:
    vs = json.load(f)
  rows = []
  for r in vs["summary"]:
    fixed = r["kvlab_median_prefill_s"] + r["kvlab_median_compress_s"]
    row = {"method": r["method"], "prompt_tokens": r["prompt_tokens"],
           "measured": r["kvpress_over_kvlab"],
           "kvlab_decode_s_per_token": r["kvlab_median_decode_s"] / vs["new_tokens"]}
    for i, (name, per_token) in enumerate(floors.items()):
      key = "ceiling" if i == 0 else f"ceiling_at_{name}"
      row[key] = r["kvpress_median_s"] / (fixed + vs["new_tokens"] * per_token)
    rows.append(row)
  return rows


def main(argv):
  del argv
  launch_config.apply()
  res = {"benchmark": "bench_cpu_floors", "device": device_description(), "git": git_rev(),
         "jax": jax.__version__, "reps": FLAGS.reps,
         "command": " ".join(["python -m experiments.bench_cpu_floors"] + sys.argv[1:])}
  parts = {"attention": lambda: [attention(int(c), FLAGS.reps) for c in FLAGS.cached],
           "weights": lambda: weights(FLAGS.reps), "moments": lambda: moments(FLAGS.reps),
           "decode": lambda: decode(FLAGS.reps),
           "prefill": lambda: prefill(FLAGS.prefill_length, FLAGS.reps)}
  for part in FLAGS.parts:
    if part not in parts:
      raise ValueError(f"--parts: unknown {part!r}; choose from {', '.join(parts)}")
    res[part] = parts[part]()
  if "weights" in res:
    w = res["weights"]
    floor = w["model_fp32_bytes"] * w["stacked_gemv_s"] / w["stacked_bytes"]
    w["decode_floor_s_per_token"] = floor
    # The same bound with every weight read at the plain read's rate (what no GEMV layout here
    # reaches: the per-layer switch comes nearest), i.e. the machine's, not the layout's, floor.
    read_floor = w["read_model_s"]
    w["read_floor_s_per_token"] = read_floor
    if FLAGS.vs_kvpress:
      floors = {"stacked_gemv_floor": floor, "read_floor": read_floor}
      res["kvpress_ceiling"] = {"from": FLAGS.vs_kvpress,
                                "rows": kvpress_ceiling(FLAGS.vs_kvpress, floors)}
    if "decode" in res:
      res["decode"]["floor_s_per_token"] = floor
  for part in ("attention", "weights", "moments", "decode", "prefill", "kvpress_ceiling"):
    print(part, res.get(part))
  write_result(FLAGS.out, res)


if __name__ == "__main__":
  app.run(main)
