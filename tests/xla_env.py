"""Environments for the tests' subprocesses: N host devices, or XLA's default optimisation."""

import os
import subprocess
import sys

SUITE_FLAG = "--xla_backend_optimization_level=0"  # set by conftest for the whole suite
# Also set by conftest, and kept by ``optimized()``: XLA CPU's classic loop emitters instead of
# its MLIR fusion emitters. They compile the suite's many small programs faster (measured one
# file at a time, back to back: test_lowrank 50 -> 37 s, test_kivi 54 -> 35 s, test_online
# 59 -> 44 s), and the default model runs no slower with them (2k prefill 450-463 vs
# 442-476 tok/s, decode 49-50 vs 51-55 ms/token, alternated).
COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"


def xla_accepts(flag: str) -> bool:
  """Whether this jaxlib's XLA knows ``flag``: XLA aborts the process on an unknown one in
  XLA_FLAGS, and the suite installs the newest jax. Probed in a fresh process (about 2 s)."""
  env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
  code = "import jax; jax.devices()"
  return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                        timeout=300).returncode == 0


def with_host_devices(n: int, **extra) -> dict:
  """Returns os.environ plus ``--xla_force_host_platform_device_count=n`` added to the XLA_FLAGS
  already set (conftest's compile flags carry over) and ``extra``."""
  flags = os.environ.get("XLA_FLAGS", "")
  return {**os.environ, **extra,
          "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n}".strip()}


def optimized() -> dict:
  """Returns os.environ without conftest's ``SUITE_FLAG``: for a subprocess
  that runs the default model over thousands of tokens, where the unoptimised code of the
  elementwise fusions costs more than the compiles it saves (a 4096-token prefill: 31 s at
  XLA's default level, 61 s at level 0)."""
  flags = os.environ.get("XLA_FLAGS", "").replace(SUITE_FLAG, "").strip()
  return {**os.environ, "XLA_FLAGS": flags}
