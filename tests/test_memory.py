"""Clear errors before (and when) a cache does not fit the memory limit."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from kvlab.lib import memory
from kvlab.lib.cache import KVCache
from xla_env import optimized

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_planned_nbytes_matches_the_allocated_leaves():
  kw = dict(num_layers=3, batch=2, kv_heads=2, capacity=40, head_dim=8, dtype=jnp.bfloat16)
  assert KVCache.planned_nbytes(**kw) == KVCache.init(**kw).nbytes


def test_check_fits_names_the_limit_and_the_fix(monkeypatch):
  monkeypatch.setenv("KVLAB_MEMORY_LIMIT_GIB", "0.01")
  free, source = memory.headroom()
  assert "KVLAB_MEMORY_LIMIT_GIB" in source and free < 0  # the process is already bigger
  with pytest.raises(MemoryError, match=r"needs 1\.00 GiB.*KVLAB_MEMORY_LIMIT_GIB.*lower it"):
    memory.check_fits(2**30, "a cache", "lower it")
  monkeypatch.setenv("KVLAB_MEMORY_LIMIT_GIB", "10000")
  memory.check_fits(2**30, "a cache", "lower it")  # fits: no error


def test_check_fits_refuses_more_than_the_available_physical_memory(monkeypatch):
  """Without a ulimit, cgroup or KVLAB_MEMORY_LIMIT_GIB, the machine's RAM is the limit."""
  monkeypatch.delenv("KVLAB_MEMORY_LIMIT_GIB", raising=False)
  monkeypatch.setattr(memory, "available_bytes", lambda: 2**30, raising=False)
  with pytest.raises(MemoryError, match=r"needs 2\.00 GiB \(2\.20 GiB with the margin\) but only "
                     r"1\.00 GiB is left under the machine's available physical memory "
                     r"\(MemAvailable.*; lower it"):
    memory.check_fits(2 * 2**30, "a cache", "lower it")
  memory.check_fits(2**29, "a cache", "lower it")  # fits
  monkeypatch.setenv("KVLAB_MEMORY_LIMIT_GIB", "10000")  # stands in for the RAM: swap on purpose
  memory.check_fits(2 * 2**30, "a cache", "lower it")


def test_check_fits_refuses_four_times_the_machines_memory(monkeypatch):
  monkeypatch.delenv("KVLAB_MEMORY_LIMIT_GIB", raising=False)
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # physical RAM
  with pytest.raises(MemoryError, match=r"a cache needs .* GiB .*; lower it"):
    memory.check_fits(4 * total, "a cache", "lower it")


def test_explain_oom_converts_only_out_of_memory():
  Fake = jax.errors.JaxRuntimeError  # what XLA raises; constructible from a message
  with pytest.raises(MemoryError, match="prefill ran out of memory.*use less"):
    with memory.explain_oom("prefill", "use less"):
      raise Fake("RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes.")
  with pytest.raises(jax.errors.JaxRuntimeError, match="INVALID_ARGUMENT"):
    with memory.explain_oom("prefill", "use less"):
      raise Fake("INVALID_ARGUMENT: something else")


def _plain_env() -> dict:
  """The subprocesses' environment: without the run's shared compilation cache (tests/
  conftest.py), since loading executables from it instead of compiling changes a process's
  resident size by more than the 0.1 GiB margins below; and at XLA's default optimisation
  (tests/xla_env.py): these are long prefills."""
  return {k: v for k, v in optimized().items() if k != "JAX_COMPILATION_CACHE_DIR"}


def _last_json(proc) -> dict:
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_default_model_4096_token_prefill_peaks_under_4_gib():
  """Default model, one 4096-token prompt, full cache: the process peaks under 4 GiB."""
  probe = subprocess.run([sys.executable, "-m", "experiments.prefill_memory", "--length=4096"],
                         cwd=ROOT, capture_output=True, text=True, check=True, env=_plain_env())
  row = _last_json(probe)
  assert row["prompt_tokens"] == 4096 and row["method"] is None
  assert row["peak_rss_bytes"] < 4 * 2**30, row


@pytest.fixture(scope="module")
def wide_tiny(tmp_path_factory, default_model):
  """A tiny random Llama whose cache is large next to its compute (16 layers x 8 kv heads x 64:
  64 KiB a token in fp32, SmolLM2's is 45 KiB) with SmolLM2's tokenizer, so the memory-limit
  test below prefills thousands of tokens in seconds (the mechanism does not depend on the
  model; the default model's figures are in results/bench_online_memory_cpu.json)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  d = tmp_path_factory.mktemp("wide_tiny")
  cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=16, num_attention_heads=8,
                                 num_key_value_heads=8, head_dim=64,
                                 max_position_embeddings=4096, tie_word_embeddings=True)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
  default_model.tokenizer._tok.save(str(d / "tokenizer.json"))  # pylint: disable=protected-access
  return str(d)


def test_full_cache_fails_cleanly_where_compressing_during_prefill_fits(wide_tiny):
  """4 prompts of ~2048 tokens under a resident-memory cap set between the two caches' needs:
  the full-cache prefill stops with one clear error; the online mode completes."""
  base = [sys.executable, "-m", "experiments.prefill_memory", f"--model={wide_tiny}"]
  # The full cache of 4 x 2048 tokens needs 0.51 GiB (x1.1: check_fits' margin, 0.56), the
  # online one (512 kept + a 256-token chunk per row) 0.19 GiB (0.21): a cap 0.38 GiB above the
  # loaded process's resident size separates them with > 0.15 GiB to spare on each side
  # (resident sizes vary between processes). The probe, a short prompt without a cap, gives
  # that resident size (model loaded, nothing compiled: the same in every mode and batch).
  probe = subprocess.run(base + ["--length=64"], cwd=ROOT, capture_output=True, text=True,
                         check=True, env=_plain_env())
  cap = (_last_json(probe)["rss_before_prefill_bytes"] + 0.38 * 2**30) / 2**30
  env = {**_plain_env(), "KVLAB_MEMORY_LIMIT_GIB": f"{cap:.3f}"}
  four = base + ["--length=2048", "--batch=4", "--method=knorm", "--ratio=0.25",
                 "--chunk_size=256"]
  full = subprocess.run(four + ["--nocompress_during_prefill"], cwd=ROOT, capture_output=True,
                        text=True, env=env)
  assert full.returncode == 2, full.stderr[-2000:]
  assert "compress while prefilling (--compress_during_prefill" in full.stderr
  assert "KVLAB_MEMORY_LIMIT_GIB" in full.stderr and "Traceback" not in full.stderr
  online = subprocess.run(four + ["--compress_during_prefill"], cwd=ROOT, capture_output=True,
                          text=True, env=env)
  assert online.returncode == 0, online.stderr[-2000:]
  row = _last_json(online)
  assert row["prompt_tokens"] == 2048 and row["batch"] == 4
  full_bytes = 4 * 2048 * 16 * 8 * (64 * 2 * 4 + 4)  # k, v (f32), positions
  assert row["peak_cache_bytes"] <= (512 + 256) / 2048 * full_bytes + 4096  # budget + one chunk
