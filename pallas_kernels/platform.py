"""Which Pallas backend a kernel call lowers to, and what that backend needs of its shapes.

``pl.pallas_call`` picks its GPU backend from the type of ``compiler_params``: without them it
takes Mosaic GPU, whose copies need warpgroup-sized (128-byte multiples) transfers that a
per-(row, head) decode block of a few scalars does not give. Our decode kernels are written for
Triton, so on GPU they pass Triton's parameters. Triton also needs every array inside the kernel
to have a power-of-two size, and ``tl.dot`` needs each of its dimensions >= 16, so the wrappers
pad the query heads of a group (G), the listed pages and the residual window on GPU
(``gpu_padding``) and slice the padding off the result.

TPU (Mosaic) blocks need their last two dimensions divisible by (8, 128) or whole, which a
per-(row, head) ``[1, M]`` table row is not: both kernels have a TPU variant with their tables
and counts in SMEM (``*_tpu.py``). ``check_lowerable`` gives one clear error for a platform with
no lowering (CPU without ``interpret``) instead of failing deep in the lowering.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pl_tpu
from jax.experimental.pallas import triton as pl_triton

GPU = ("gpu", "cuda", "rocm")


def target(platform: str | None) -> str:
  """The platform a call lowers for: ``platform``, else JAX's default backend."""
  return jax.default_backend() if platform is None else platform


def check_lowerable(platform: str | None, interpret: bool, kernel: str, tpu: bool = False) -> None:
  """Raises ``NotImplementedError`` naming the fix when ``kernel`` has no compiled lowering for
  the target platform (CPU without ``interpret``; TPU unless ``tpu``)."""
  p = target(platform)
  if interpret or p in GPU or (tpu and p == "tpu"):
    return
  where = "GPU (Triton) and TPU (Mosaic)" if tpu else "GPU (Triton)"
  raise NotImplementedError(
      f"{kernel} is compiled only for {where}; on {p} run it with interpret=True (slow, "
      "for tests) or use attention's XLA path (impl='xla', the default)")


def compiler_params(platform: str | None, interpret: bool):
  """``compiler_params`` for ``pl.pallas_call``: Triton's on GPU, None when interpreted."""
  if interpret or target(platform) not in GPU:
    return None
  return pl_triton.CompilerParams(num_warps=4, num_stages=2)


def pow2(n: int, at_least: int = 1) -> int:
  """The smallest power of two >= max(n, at_least)."""
  n = max(n, at_least, 1)
  return 1 << (n - 1).bit_length()


def gpu_padding(platform: str | None) -> bool:
  """Whether a call pads its kernel-side shapes to Triton's needs: when it targets a GPU, also
  interpreted (``platform="gpu", interpret=True`` runs the padded kernel on CPU, so tests check
  the padding)."""
  return target(platform) in GPU


def tpu_call_options(interpret: bool) -> dict:
  """``pl.pallas_call`` keywords for a TPU kernel over a ``(B, K)`` grid: TPU interpret mode on
  CPU (DMAs and semaphores simulated) or Mosaic with both grid axes parallel."""
  if interpret:
    return {"interpret": pl_tpu.InterpretParams()}
  return {"compiler_params": pl_tpu.CompilerParams(dimension_semantics=("parallel", "parallel"))}


def default_partitions(b: int, k: int, n_steps: int, platform: str | None,
                       interpret: bool) -> int:
  """Split-K partitions of a decode kernel's sequential walk (``n_steps`` blocks or pages per
  (b, k)) when the caller names none: on GPU enough for about two programs per streaming
  multiprocessor (the device's ``core_count``, 132 if unknown), at most one per step; elsewhere
  1 (the interpreter and the TPU variants gain nothing)."""
  if interpret or target(platform) not in GPU:
    return 1
  sms = getattr(jax.devices()[0], "core_count", None) or 132
  return max(1, min(n_steps, -(-2 * sms // (b * k))))


def split(n_steps: int, partitions: int) -> tuple[int, int]:
  """``(steps per partition, partitions used)`` for ``partitions`` requested (>= 1; clamped so
  that no partition is empty)."""
  if partitions < 1:
    raise ValueError(f"partitions must be >= 1, got {partitions}")
  per = -(-max(n_steps, 1) // min(partitions, max(n_steps, 1)))
  return per, -(-max(n_steps, 1) // per)
