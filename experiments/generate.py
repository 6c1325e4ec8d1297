r"""Generate text with a model: ``python -m experiments.generate --prompt="..."``.

Loads ``--model`` (default: the embedded SmolLM2-135M-Instruct GGUF, or any HF checkpoint
directory / .gguf file), applies the checkpoint's chat template, prefills in chunks and decodes
with a jitted loop (or token by token with ``--stream``), then prints timings.
"""

import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from kvlab import models
from kvlab.lib import distributed, flag_checks, sharding
from kvlab.lib import generate as gen
from kvlab.lib import methods
from kvlab.lib.eval.runner import method_observations
from kvlab.lib.protocol import ask, compress_for, prefill_context
from kvlab.lib.sampling import SamplingConfig, sample
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
distributed.define_flags()
flags.DEFINE_string("model", "smollm2-135m", "Named model, HF checkpoint dir or .gguf file.")
flags.DEFINE_string("prompt", "What is the capital of France?", "User prompt.")
flags.DEFINE_string("system", None, "Optional system message (chat mode).")
flags.DEFINE_bool("chat", True, "Wrap the prompt in the checkpoint's chat template.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "0 = off.")
flags.DEFINE_float("top_p", 1.0, "1 = off.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and cache dtype.")
flags.DEFINE_integer("chunk_size", 512, "Prefill chunk length.")
flags.DEFINE_string("method", None, "Compress the prompt's cache before decoding with this "
                    "method (registry name, 'a+b' composes); decode-time methods keep evicting.")
flags.DEFINE_float("ratio", 0.5, "Fraction of the prompt's cache kept (with --method).")
flags.DEFINE_bool("stream", False, "Print tokens as they are decoded (Python loop of jitted "
                  "decode steps; slower than the fused loop).")

flag_checks.utf8_text("prompt")
flag_checks.at_least("max_new_tokens", 1, why="there is nothing to generate otherwise")
flag_checks.at_least("chunk_size", 8)
flag_checks.at_least("top_k", 0)
flag_checks.at_least("seed", 0)
flags.register_validator("ratio", lambda r: 0.0 < r <= 1.0,
                         "must be in (0, 1]: the fraction of the prompt's cache kept")
flags.register_validator("temperature", lambda t: t >= 0.0, "must be >= 0 (0 = greedy)")
flags.register_validator("top_p", lambda p: 0.0 < p <= 1.0, "must be in (0, 1] (1 = off)")
flag_checks.define_method_module()
flag_checks.method_specs("method", "ratio", optional=True)


def _stream(m, ids, sampling):
  chunk = min(FLAGS.chunk_size, gen.round_up(len(ids), 8))
  tokens, lengths = gen.pad_batch([ids], chunk)
  gen.check_context(lengths, FLAGS.max_new_tokens, m.config.max_position_embeddings)
  cache = m.new_cache(1, tokens.shape[1] + FLAGS.max_new_tokens)
  t0 = time.perf_counter()
  logits, cache, _ = gen.prefill(m.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                                 apply_fn=m.apply_fn, chunk_size=chunk)
  logits.block_until_ready()
  t1 = time.perf_counter()
  rng = jax.random.PRNGKey(FLAGS.seed)
  out, shown = [], ""
  stops = set(m.stop_tokens)
  for _ in range(FLAGS.max_new_tokens):
    rng, sub = jax.random.split(rng)
    tok = int(sample(logits, sub, sampling)[0])
    out.append(tok)
    text = m.tokenizer.decode(out)
    sys.stdout.write(text[len(shown):])
    sys.stdout.flush()
    shown = text
    if tok in stops:
      break
    logits, cache = gen.decode_step(m.params, jnp.asarray([tok], jnp.int32), cache,
                                    apply_fn=m.apply_fn)
  print()
  return out, t1 - t0, time.perf_counter() - t1


def main(argv):
  del argv
  launch_config.apply()
  distributed.initialize_from_flags()
  dtype = jnp.float32 if FLAGS.dtype == "float32" else jnp.bfloat16
  t = time.perf_counter()
  if not FLAGS.prompt:
    raise app.UsageError("--prompt is empty: give the text to answer")
  m = models.load(FLAGS.model, dtype=dtype)
  m, _ = sharding.place_model(m, FLAGS.mesh)
  load_s = time.perf_counter() - t
  limit = m.config.max_position_embeddings
  if FLAGS.max_new_tokens >= limit:
    raise app.UsageError(f"--max_new_tokens={FLAGS.max_new_tokens} is not below the model's "
                         f"context of {limit} tokens (prompt and answer share it): use "
                         f"--max_new_tokens<={limit // 2}")
  if FLAGS.chat and m.tokenizer.chat_template:
    ids = m.tokenizer.encode_chat(FLAGS.prompt, system=FLAGS.system)
  else:
    ids = m.tokenizer.encode(FLAGS.prompt)
  sampling = SamplingConfig(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  print(f"model: {m.source} ({m.config.family}, {m.config.num_params / 1e6:.0f}M params, "
        f"{FLAGS.dtype}); loaded in {load_s:.1f}s; prompt: {len(ids)} tokens", file=sys.stderr)
  if FLAGS.method:
    method = methods.make(FLAGS.method, ratio=FLAGS.ratio)
    methods.check_for_model(method, m.config, m.params, f"{FLAGS.model} ({m.source})")
    c = m.config
    gen.check_context([len(ids)], FLAGS.max_new_tokens, c.max_position_embeddings)
    # The prompt minus its last token is compressed; the last token is then fed to start
    # decoding, so the method saw the whole question (query-aware).
    cache, obs, prefill_s = prefill_context(
        m.params, m.apply_fn, [ids[:-1]], num_layers=c.num_layers, kv_heads=c.num_kv_heads,
        head_dim=c.head_dim, dtype=m.dtype, observe=method.observe, chunk_size=FLAGS.chunk_size)
    obs, _ = method_observations(m, method, cache, ids[:-1], (obs,), (method.observe,),
                                 FLAGS.chunk_size)  # KVzip's repeat passes, where it has them
    full_bytes = cache.trimmed().nbytes  # as the compressed cache's: no padding past the prompt
    evicting = hasattr(method, "update")
    small, kept, _ = compress_for(method, cache, obs, 9 if evicting else 8 + FLAGS.max_new_tokens)
    answers, decode_s = ask(m.params, m.apply_fn, small, [ids[-1:]],
                            max_new_tokens=FLAGS.max_new_tokens, stop_tokens=m.stop_tokens,
                            method=method)
    out = answers[0]
    n = len(out)
    text = m.tokenizer.decode(out)
    print(text)
    frac = methods.kept_fraction(method)
    nominal = "" if frac is None or abs(frac - FLAGS.ratio) < 1e-9 else (
        f" (nominal kept fraction {frac:.3g}: methods.kept_fraction)")
    print(f"[{FLAGS.method} kept {FLAGS.ratio:g}{nominal}: cache {kept / 1e6:.2f} MB vs full "
          f"{full_bytes / 1e6:.2f} MB, from the leaves]", file=sys.stderr)
    warning = methods.size_warning(FLAGS.method, kept, full_bytes, len(ids) - 1)
    if warning:
      print(f"warning: {warning}", file=sys.stderr)
    if not text.strip():
      print(f"warning: {FLAGS.method}: the answer is empty (the model stopped at once); run "
            "without --method to compare", file=sys.stderr)
  elif FLAGS.stream:
    out, prefill_s, decode_s = _stream(m, ids, sampling)
    n = len(out)
  else:
    res = m.generate_ids([ids], max_new_tokens=FLAGS.max_new_tokens, sampling=sampling,
                         seed=FLAGS.seed, chunk_size=FLAGS.chunk_size)
    out, prefill_s, decode_s = res["tokens"][0], res["prefill_s"], res["decode_s"]
    n = len(out)
    print(m.tokenizer.decode(out))
  print(f"[prefill {len(ids)} tok in {prefill_s:.2f}s incl. compile | decode {n} tok in "
        f"{decode_s:.2f}s incl. compile = {1000 * decode_s / max(n, 1):.1f} ms/tok; "
        f"timings without compile: experiments/bench_generate.py]", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
