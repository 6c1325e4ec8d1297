r"""kvlab vs NVIDIA kvpress, end to end on the same model, prompts and machine, in one run.

  python -m experiments.bench_vs_kvpress --lengths=1024 --cases=3 \
      --out=results/bench_vs_kvpress_cpu.json

One case = prefill the prompt + compress its cache (ratio kept, 0.5 by default) + 32 greedy
tokens decoded from the compressed cache. kvlab: ``gen.prefill`` with the method's observe
hook, ``methods.compress``, ``gen.decode_loop`` (jitted). kvpress: the press context manager
around the prefill forward (it compresses inside the attention hooks), then a greedy loop of
single-token forwards whose ``position_ids`` continue from the prompt length, which is what
``KVPressTextGenerationPipeline`` does after its prefill (``model.generate`` would restart the
positions at the compressed length). Both sides see the same token ids (stdlib-docs text, one
character offset per case) and use the same options (SnapKV window 32, kernel 5; 4 sinks;
ExpectedAttention defaults). Each (method, length) gets one warm-up per side first (kvlab's is
reported as compile time); then the cases alternate which side runs first, so machine noise
hits both. Reported: per-case seconds, their medians and kvpress/kvlab. The load average is
recorded before and after: on a shared machine absolute seconds are inflated, the ratio less so.
"""

import os

# PyTorch's OpenMP workers spin after each call and steal the cores from XLA's threads in the
# next case (see bench_generate); passive waits keep the alternation fair. Set before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import statistics
import subprocess
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from kvlab import models
from kvlab.lib import attention
from kvlab.lib import generate as gen
from kvlab.lib import methods
from kvlab.lib.data.text import text_of_tokens
from kvlab.lib.eval.runner import method_observations
from kvlab.lib.methods.kvzip import reconstructor
from kvlab.lib.provenance import device_description, git_rev
from kvlab.lib import launch_config

FLAGS = flags.FLAGS
launch_config.define()
flags.DEFINE_string("model", "smollm2-135m", "Model (transformers must load the same file).")
flags.DEFINE_list("methods", ["snapkv", "streaming_llm", "knorm", "expected_attention"],
                  "Methods (kvlab registry names; 'none' = no compression on either side).")
flags.DEFINE_list("lengths", ["1024", "2048"], "Prompt lengths in tokens.")
flags.DEFINE_float("ratio", 0.5, "Fraction of the prompt's cache kept.")
flags.DEFINE_integer("cases", 3, "Timed cases (distinct prompts) per method and length.")
flags.DEFINE_integer("new_tokens", 32, "Greedy tokens decoded per case.")
flags.DEFINE_integer("threads", 0, "Torch threads (0: os.cpu_count(), what XLA's CPU client "
                     "uses).")
flags.DEFINE_string("hf_attn", "sdpa", "transformers attention implementation for kvpress.")
flags.DEFINE_integer("chunk", 512, "kvlab's prefill chunk (tokens per step of its chunked "
                     "prefill).")
flags.DEFINE_integer("attn_block_size", 512, "kvlab's attention block (cache slots per "
                     "online-softmax step, prefill and decode).")
flags.DEFINE_float("decode_block_mib", 1.0, "Cap on one decode step's block of keys, MiB "
                   "(lib.attention.DECODE_BLOCK_BYTES; 1 MiB is the CPU's L2-sized default).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and cache dtype, both "
                  "sides.")
flags.DEFINE_string("torch_device", "auto", "Device of the kvpress side: 'auto' is cuda when JAX "
                    "computes on a GPU (and torch sees one), else cpu.")
flags.DEFINE_string("out", "results/bench_vs_kvpress_cpu.json", "JSON output.")

SNAPKV_WINDOW, SNAPKV_KERNEL, SINKS = 32, 5, 4


def _pair(name: str, ratio: float):
  """(kvlab method or None, kvpress press or None) configured alike."""
  import kvpress  # pylint: disable=g-import-not-at-top
  drop = 1.0 - ratio  # kvpress's compression_ratio is the fraction removed
  if name == "none":
    return None, None
  if name == "snapkv":
    return (methods.SnapKV(ratio=ratio, window=SNAPKV_WINDOW, kernel=SNAPKV_KERNEL),
            kvpress.SnapKVPress(compression_ratio=drop, window_size=SNAPKV_WINDOW,
                                kernel_size=SNAPKV_KERNEL))
  if name == "streaming_llm":
    return (methods.StreamingLLM(ratio=ratio, sinks=SINKS),
            kvpress.StreamingLLMPress(compression_ratio=drop, n_sink=SINKS))
  if name == "knorm":
    return methods.Knorm(ratio=ratio), kvpress.KnormPress(compression_ratio=drop)
  if name == "expected_attention":
    return (methods.ExpectedAttention(ratio=ratio),
            kvpress.ExpectedAttentionPress(compression_ratio=drop))
  if name == "kvzip":  # chunk 2048 and 4 sinks on both sides; one budget per layer in kvpress
    return (methods.KVzip(ratio=ratio),
            kvpress.KVzipPress(compression_ratio=drop, layerwise=True))
  raise ValueError(f"no kvpress counterpart configured for {name!r}; choose from none, "
                   "snapkv, streaming_llm, knorm, expected_attention, kvzip")


def kvlab_case(lm, ids, method, n_new):
  """Seconds (total, prefill, compress, decode) and the generated ids."""
  t0 = time.perf_counter()
  tokens, lengths = gen.pad_batch([ids], FLAGS.chunk)
  cache = lm.new_cache(1, tokens.shape[1] + n_new)
  logits, cache, obs = gen.prefill(lm.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                                   apply_fn=lm.apply_fn, chunk_size=FLAGS.chunk,
                                   observe=None if method is None else method.observe)
  jax.block_until_ready((logits, obs))
  t1 = time.perf_counter()
  if method is not None:
    if reconstructor(method) is not None:  # KVzip: the repeat passes are part of compress
      obs, _ = method_observations(lm, method, cache, ids, chunk_size=FLAGS.chunk)
    cache = methods.compress(method, cache, obs, extra=n_new)
    jax.block_until_ready(cache)
  t2 = time.perf_counter()
  out, _, _ = gen.decode_loop(lm.params, cache, logits, jax.random.PRNGKey(0),
                              apply_fn=lm.apply_fn, max_new_tokens=n_new)
  out = np.asarray(out)[0].tolist()
  t3 = time.perf_counter()
  return {"total_s": t3 - t0, "prefill_s": t1 - t0, "compress_s": t2 - t1,
          "decode_s": t3 - t2}, out


def kvpress_case(hf, ids, press, n_new):
  """Seconds (total, prefill incl. compression, decode) and the generated ids."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  n = len(ids)
  dev = hf.device
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
  with torch.inference_mode():
    t0 = time.perf_counter()
    cache = transformers.DynamicCache()
    with press(hf) if press is not None else contextlib.nullcontext():
      logits = hf(torch.tensor([ids], device=dev), past_key_values=cache, use_cache=True,
                  logits_to_keep=1).logits
    sync()
    t1 = time.perf_counter()
    tok = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
    out = [int(tok)]
    for i in range(n_new - 1):
      logits = hf(tok, past_key_values=cache, use_cache=True,
                  position_ids=torch.tensor([[n + i]], device=dev)).logits
      tok = logits[:, -1].argmax(-1, keepdim=True)
      out.append(int(tok))
    t2 = time.perf_counter()
  kept = cache.get_seq_length() - (n_new - 1)
  return {"total_s": t2 - t0, "prefill_s": t1 - t0, "decode_s": t2 - t1,
          "kept_tokens_layer0": kept}, out


def _load_hf(path: str, attn: str, dtype: str = "float32", device: str = "cpu"):
  """The same checkpoint in transformers (``dtype``, on ``device``); a ``.gguf`` is dequantized
  by transformers."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  kw = dict(dtype=getattr(torch, dtype), attn_implementation=attn)
  if path.endswith(".gguf"):
    kw["gguf_file"] = os.path.basename(path)
    path = os.path.dirname(path)
  return transformers.AutoModelForCausalLM.from_pretrained(path, **kw).to(device).eval()


def _torch_device(flag: str) -> str:
  """``flag`` unless 'auto': then cuda when JAX computes on a GPU and torch sees one, else cpu."""
  import torch  # pylint: disable=g-import-not-at-top
  if flag != "auto":
    return flag
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _load_note() -> dict:
  la = os.getloadavg()
  try:
    up = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
  except OSError:
    up = None
  return {"loadavg_1_5_15": [round(x, 2) for x in la], "uptime": up}


def _chat_context(tokenizer, ids: list[int]) -> list[int]:
  """``ids`` behind the chat template's head (system prompt and user header), same length:
  KVzip's repeats close the user turn, and kvpress takes the context to start with the head."""
  marker = "@@context@@"
  head = tokenizer.apply_chat_template([{"role": "user", "content": marker}]).split(marker)[0]
  pre = tokenizer.encode(head, add_special_tokens=True)
  return pre + ids[:len(ids) - len(pre)]


def _kvzip_tokenizer(source: str):
  """``KVzipPress`` loads a tokenizer from the model's name; a GGUF's directory has none, so
  hand it the one transformers reads from the GGUF itself."""
  import types  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from kvpress.presses import kvzip_press  # pylint: disable=g-import-not-at-top
  if source.endswith(".gguf"):
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(source),
                                                     gguf_file=os.path.basename(source))
  else:
    tok = transformers.AutoTokenizer.from_pretrained(source)
  kvzip_press.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: tok)


def _same_prefix(a, b) -> int:
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def main(argv):
  del argv
  launch_config.apply()
  import kvpress  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  transformers.utils.logging.disable_progress_bar()
  threads = FLAGS.threads or os.cpu_count()
  torch.set_num_threads(threads)
  load_before = _load_note()
  attention.DECODE_BLOCK_BYTES = int(FLAGS.decode_block_mib * (1 << 20))
  lm = models.load(FLAGS.model, dtype=getattr(jnp, FLAGS.dtype), progress=False,
                   attn_block_size=FLAGS.attn_block_size)
  torch_device = _torch_device(FLAGS.torch_device)
  if torch_device.startswith("cuda"):
    # XLA's GPU GEMMs take float32 operands through TF32 at JAX's default precision; let torch
    # do the same so neither side computes at a higher precision than the other.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  hf = _load_hf(lm.source, FLAGS.hf_attn, FLAGS.dtype, torch_device)
  n_new = FLAGS.new_tokens
  if "kvzip" in FLAGS.methods:
    _kvzip_tokenizer(lm.source)
  rows, summary = [], []
  t_start = time.perf_counter()
  for length in (int(x) for x in FLAGS.lengths):
    prompts = [text_of_tokens(lm.tokenizer, length, offset_chars=30000 * (1 + c))
               for c in range(FLAGS.cases + 1)]  # [0] is the warm-up prompt
    for name in FLAGS.methods:
      method, press = _pair(name, FLAGS.ratio)
      ids = [_chat_context(lm.tokenizer, p) for p in prompts] if name == "kvzip" else prompts
      warm_k, _ = kvlab_case(lm, ids[0], method, n_new)
      warm_p, _ = kvpress_case(hf, ids[0], press, n_new)
      ks, ps = [], []
      for c in range(1, FLAGS.cases + 1):
        first_kvlab = c % 2 == 1
        if first_kvlab:
          k, k_out = kvlab_case(lm, ids[c], method, n_new)
        p, p_out = kvpress_case(hf, ids[c], press, n_new)
        if not first_kvlab:
          k, k_out = kvlab_case(lm, ids[c], method, n_new)
        ks.append(k)
        ps.append(p)
        row = {"method": name, "prompt_tokens": length, "case": c, "kvlab": k, "kvpress": p,
               "first": "kvlab" if first_kvlab else "kvpress",
               "same_greedy_prefix_tokens": _same_prefix(k_out, p_out)}
        rows.append(row)
        print(json.dumps(row), flush=True)
      med_k = statistics.median(x["total_s"] for x in ks)
      med_p = statistics.median(x["total_s"] for x in ps)
      s = {"method": name, "prompt_tokens": length, "cases": FLAGS.cases,
           "kvlab_median_s": med_k, "kvpress_median_s": med_p,
           "kvpress_over_kvlab": med_p / med_k,
           "kvlab_median_prefill_s": statistics.median(x["prefill_s"] for x in ks),
           "kvlab_median_compress_s": statistics.median(x["compress_s"] for x in ks),
           "kvlab_median_decode_s": statistics.median(x["decode_s"] for x in ks),
           "kvpress_median_prefill_compress_s": statistics.median(x["prefill_s"] for x in ps),
           "kvpress_median_decode_s": statistics.median(x["decode_s"] for x in ps),
           "kvlab_warmup_s": warm_k["total_s"],
           "kvlab_compile_s": max(warm_k["total_s"] - med_k, 0.0),
           "kvpress_warmup_s": warm_p["total_s"]}
      summary.append(s)
      print(json.dumps(s), flush=True)
  load_after = _load_note()
  # Judged from the load before the run only: the one afterwards counts this benchmark's own
  # threads (about 1.6 on 2 cores for a run alone).
  busy = load_before["loadavg_1_5_15"][0] > 0.5 * threads
  result = {
      "benchmark": "bench_vs_kvpress", "model": FLAGS.model, "source": lm.source,
      "dtype": FLAGS.dtype, "chunk": FLAGS.chunk,
      "attn_block_size": FLAGS.attn_block_size, "decode_block_mib": FLAGS.decode_block_mib,
      "ratio_kept": FLAGS.ratio, "new_tokens": n_new,
      "summary": summary, "cases": rows, "wall_s": time.perf_counter() - t_start,
      "device": device_description(), "torch_device": (
          f"{torch_device}: {torch.cuda.get_device_name()}" if torch_device.startswith("cuda")
          else torch_device),
      "torch_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
      "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
      "threads": {"torch": torch.get_num_threads(), "xla_cpu": os.cpu_count(),
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
      "hf_attn_implementation": FLAGS.hf_attn,
      "load_before": load_before, "load_after": load_after,
      "concurrent_load": busy,
      "note": ("taken while other jobs ran on this machine (see load averages): absolute "
               "seconds are inflated and noisy; the sides alternate case by case, so "
               "kvpress_over_kvlab is the figure to read") if busy else
              "machine otherwise idle (load average below half the cores)",
      "versions": {"jax": jax.__version__, "torch": torch.__version__,
                   "transformers": transformers.__version__,
                   "kvpress": getattr(kvpress, "__version__", None) or _dist_version("kvpress")},
      "git": git_rev(),
      "command": "python -m experiments.bench_vs_kvpress " + " ".join(
          f"--{k}={v}" for k, v in [("methods", ",".join(FLAGS.methods)),
                                    ("lengths", ",".join(FLAGS.lengths)),
                                    ("ratio", FLAGS.ratio), ("cases", FLAGS.cases),
                                    ("new_tokens", n_new), ("dtype", FLAGS.dtype),
                                    ("chunk", FLAGS.chunk),
                                    ("attn_block_size", FLAGS.attn_block_size),
                                    ("decode_block_mib", FLAGS.decode_block_mib),
                                    ("model", FLAGS.model), ("out", FLAGS.out)]),
  }
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {FLAGS.out}")


def _dist_version(name: str):
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


if __name__ == "__main__":
  app.run(main)
