"""Clear errors before (and when) a cache does not fit the memory limit."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from lib import memory
from lib.cache import KVCache
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


def test_explain_oom_converts_only_out_of_memory():
  Fake = jax.errors.JaxRuntimeError  # what XLA raises; constructible from a message
  with pytest.raises(MemoryError, match="prefill ran out of memory.*use less"):
    with memory.explain_oom("prefill", "use less"):
      raise Fake("RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes.")
  with pytest.raises(jax.errors.JaxRuntimeError, match="INVALID_ARGUMENT"):
    with memory.explain_oom("prefill", "use less"):
      raise Fake("INVALID_ARGUMENT: something else")


@pytest.mark.slow
def test_full_cache_fails_cleanly_where_compressing_during_prefill_fits():
  """Default model. A 4096-token full-cache prefill peaks under 4 GiB of resident memory. Then
  2 x 4096 tokens under a resident-memory cap set between the two caches' needs: the full-cache
  prefill stops with one clear error; the online mode completes."""
  base = [sys.executable, "-m", "experiments.prefill_memory", "--length=4096"]
  # The full cache of 2 x 4096 needs 0.35 GiB (x1.1 margin), the online cache (1024 + 256
  # slots) 0.11 GiB: a cap 0.25 GiB above the loaded process's resident size separates them
  # with >= 0.1 GiB to spare on each side (resident sizes vary between processes).
  # Without the run's shared compilation cache (tests/conftest.py): loading executables from it
  # instead of compiling changes a process's resident size by more than the 0.1 GiB margins.
  # And at XLA's default optimisation (tests/xla_env.py): these are long real-model runs.
  plain = {k: v for k, v in optimized().items() if k != "JAX_COMPILATION_CACHE_DIR"}
  # The probe: one full-cache prompt without a cap. Its resident size before the prefill (model
  # loaded, nothing compiled; the same in every mode and batch) places the cap below.
  probe = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, check=True, env=plain)
  import json  # pylint: disable=g-import-not-at-top
  row = json.loads(probe.stdout.strip().splitlines()[-1])
  assert row["prompt_tokens"] == 4096 and row["method"] is None
  assert row["peak_rss_bytes"] < 4 * 2**30, row
  cap = (row["rss_before_prefill_bytes"] + 0.25 * 2**30) / 2**30
  env = {**plain, "KVLAB_MEMORY_LIMIT_GIB": f"{cap:.3f}"}
  two = base + ["--batch=2", "--method=knorm", "--ratio=0.25", "--chunk_size=256"]
  full = subprocess.run(two + ["--nocompress_during_prefill"], cwd=ROOT, capture_output=True,
                        text=True, env=env)
  assert full.returncode == 2, full.stderr[-2000:]
  assert "compress while prefilling (--compress_during_prefill" in full.stderr
  assert "KVLAB_MEMORY_LIMIT_GIB" in full.stderr and "Traceback" not in full.stderr
  online = subprocess.run(two + ["--compress_during_prefill"], cwd=ROOT, capture_output=True,
                          text=True, env=env)
  assert online.returncode == 0, online.stderr[-2000:]
  full_bytes = 2 * 4096 * 30 * 3 * 64 * 2 * 4 + 2 * 4096 * 30 * 3 * 4  # k, v (f32), positions
  got = json.loads(online.stdout.strip().splitlines()[-1])["peak_cache_bytes"]
  assert got <= (1024 + 256) / 4096 * full_bytes + 4096  # budget + one chunk
