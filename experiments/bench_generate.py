r"""kvlab vs transformers (eager, PyTorch CPU) on the same model, prompts and machine, in one run.

  python -m experiments.bench_generate --lengths=1024,4096 --out=results/bench_generate_cpu.json

Measures prefill tokens/s and decode ms/token (greedy, fp32) at each prompt length; the two
libraries alternate repetition by repetition so machine noise hits both, and each figure is the
best of ``--reps``. Also reports decode time against the memory-bandwidth floor: bytes read per
token (weights + valid cache) divided by the measured copy bandwidth of this machine.
"""

import os

# PyTorch's OpenMP workers spin after each call and would steal the cores from XLA's threads
# in the next repetition (measured: kvlab decode 3x slower when interleaved). Passive waits
# make the alternation fair to both; set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from kvlab import models
from kvlab.lib import distributed, flag_checks, sharding
from kvlab.lib import generate as gen
from kvlab.lib.data.text import text_of_tokens
from kvlab.lib.provenance import device_description, git_rev, write_result
from kvlab.lib.reference import load_hf_reference
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
distributed.define_flags()
flags.DEFINE_string("model", "smollm2-135m", "Model (the reference must load it too).")
flags.DEFINE_list("lengths", ["1024", "4096"], "Prompt lengths.")
flags.DEFINE_integer("decode_tokens", 32, "Decode steps timed per repetition.")
flags.DEFINE_integer("reps", 3, "Repetitions (best is reported).")
flags.DEFINE_bool("reference", True, "Also time transformers eager.")
flags.DEFINE_string("out", "results/bench_generate_cpu.json", "JSON output.")

flag_checks.int_list("lengths", minimum=1)
flag_checks.at_least("decode_tokens", 1)
flag_checks.at_least("reps", 1)


def copy_bandwidth(nbytes=512 * 2**20, reps=5) -> float:
  """Bytes/s of a large numpy copy, counting read + write traffic."""
  a = np.ones(nbytes // 4, np.float32)
  b = np.empty_like(a)
  best = min(_time(lambda: np.copyto(b, a)) for _ in range(reps))
  return 2 * nbytes / best


def _time(f):
  t = time.perf_counter()
  f()
  return time.perf_counter() - t


def kvlab_run(m, ids, n_decode):
  tokens, lengths = gen.pad_batch([ids], 512)
  cache = m.new_cache(1, tokens.shape[1] + n_decode + 1)
  t0 = time.perf_counter()
  logits, cache, _ = gen.prefill(m.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                                 apply_fn=m.apply_fn, chunk_size=512)
  logits.block_until_ready()
  t1 = time.perf_counter()
  out, n, cache = gen.decode_loop(m.params, cache, logits, jax.random.PRNGKey(0),
                                  apply_fn=m.apply_fn, max_new_tokens=n_decode + 1)
  out.block_until_ready()
  t2 = time.perf_counter()
  return t1 - t0, (t2 - t1) / n_decode, np.asarray(out[0]).tolist()


def hf_run(hf, ids, n_decode):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    t0 = time.perf_counter()
    out = hf(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
    t1 = time.perf_counter()
    pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    toks = [int(tok)]
    t2 = time.perf_counter()
    for _ in range(n_decode):
      out = hf(tok, past_key_values=pkv, use_cache=True)
      pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
      toks.append(int(tok))
    t3 = time.perf_counter()
  return t1 - t0, (t3 - t2) / n_decode, toks


def main(argv):
  del argv
  launch_config.apply()
  distributed.initialize_from_flags()
  m = models.load(FLAGS.model, progress=False)
  m, _ = sharding.place_model(m, FLAGS.mesh)
  hf = load_hf_reference(m.source) if FLAGS.reference else None
  if hf is not None:
    import torch  # pylint: disable=g-import-not-at-top
    torch_threads = torch.get_num_threads()
  bw = copy_bandwidth()
  weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(m.params))
  c = m.config
  rows = []
  for length in (int(x) for x in FLAGS.lengths):
    ids = text_of_tokens(m.tokenizer, length)
    kvlab_run(m, ids, FLAGS.decode_tokens)  # compile
    k_pre, k_dec, h_pre, h_dec = [], [], [], []
    for _ in range(FLAGS.reps):
      p, d, k_toks = kvlab_run(m, ids, FLAGS.decode_tokens)
      k_pre.append(p)
      k_dec.append(d)
      if hf is not None:
        p, d, h_toks = hf_run(hf, ids, FLAGS.decode_tokens)
        h_pre.append(p)
        h_dec.append(d)
    cache_read = c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4 * (length + 1)
    floor_s = (weight_bytes + cache_read) / bw
    row = {
        "prompt_tokens": length,
        "kvlab_prefill_tok_s": length / min(k_pre),
        "kvlab_decode_ms_per_tok": 1000 * min(k_dec),
        "bytes_read_per_decode_token": weight_bytes + cache_read,
        "bandwidth_floor_ms_per_tok": 1000 * floor_s,
        "kvlab_decode_vs_floor": min(k_dec) / floor_s,
    }
    if hf is not None:
      row.update({
          "hf_prefill_tok_s": length / min(h_pre),
          "hf_decode_ms_per_tok": 1000 * min(h_dec),
          "prefill_speedup": min(h_pre) / min(k_pre),
          "decode_speedup": min(h_dec) / min(k_dec),
          "greedy_tokens_identical": k_toks == h_toks,
      })
    rows.append(row)
    print(json.dumps(row))
  result = {
      "benchmark": "bench_generate", "model": m.source, "dtype": "float32", "rows": rows,
      "copy_bandwidth_gb_s": bw / 1e9, "weight_bytes": weight_bytes,
      "device": device_description(),
      "jax": jax.__version__, "jax_backend": jax.default_backend(),
      "reference": "transformers eager" if hf is not None else None,
      "torch_threads": torch_threads if hf is not None else None,
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "reps": FLAGS.reps,
      "decode_tokens": FLAGS.decode_tokens, "git": git_rev(),
      "command": "python -m experiments.bench_generate " + " ".join(
          f"--{k}={v}" for k, v in [("lengths", ",".join(FLAGS.lengths)), ("reps", FLAGS.reps)]),
  }
  if hf is not None:
    import transformers  # pylint: disable=g-import-not-at-top
    result["transformers"] = transformers.__version__
    result["torch"] = torch.__version__
  write_result(FLAGS.out, result)


if __name__ == "__main__":
  app.run(main)
