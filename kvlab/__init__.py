"""kvlab: KV-cache compression for decoder LLMs in JAX/Flax.

  import kvlab
  lm = kvlab.load("smollm2-135m")
  r = kvlab.generate(lm, context, "What is ...?", method="snapkv", ratio=0.5)
  print(r.answer, r.cache_bytes / r.full_bytes)

The public face over the four packages that hold the code, installed under this namespace:
``kvlab.models`` (model families, loaders), ``kvlab.lib`` (the cache pytree, methods,
generation, evaluation), ``kvlab.pallas_kernels`` and ``kvlab.experiments`` (launchers).
Lower level, on token ids: ``lm.prefill(ids, observe=method)`` -> ``(logits, cache, obs)``,
``kvlab.compress(method, cache, obs, room=...)``, ``lm.decode(cache, question_ids, ...)``.
"""

from kvlab import methods
from kvlab.lib.cache import KVCache
from kvlab.lib.methods.base import compress as _compress
from kvlab.lib.pipeline import Result, generate
from kvlab.models import LanguageModel

__version__ = "0.1.0"


def load(name_or_path: str = "smollm2-135m", dtype="float32", **kw) -> LanguageModel:
  """Loads a model: a named one (``smollm2-135m``), an HF checkpoint directory
  (``config.json`` + ``*.safetensors``) or a ``.gguf`` file. ``dtype``: ``"float32"`` or
  ``"bfloat16"`` (weights and cache). Returns a ``LanguageModel``."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kvlab import models  # pylint: disable=g-import-not-at-top
  if isinstance(dtype, str):
    if dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    dtype = jnp.float32 if dtype == "float32" else jnp.bfloat16
  return models.load(name_or_path, dtype=dtype, **kw)


def compress(method, cache: KVCache, observations=None, *, room: int, block: int = 512):
  """Compresses ``cache`` (``[L, B, K, S, H]``, after ``lm.prefill``) with ``method`` (a
  spec string or ``kvlab.methods.make(...)``); ``observations`` are what prefill's observe
  hook returned. ``room``: free slots left for the tokens decoded later (question + answer):
  decoding more than that raises. Returns the smaller cache (bytes from its leaves:
  ``cache.trimmed().nbytes``)."""
  if isinstance(method, str):
    raise TypeError("pass a method object: kvlab.methods.make(spec, ratio=...)")
  if observations is None and getattr(method, "observe", None) is not None:
    raise ValueError(f"{getattr(method, 'name', method)} needs the observations of its prefill "
                     "hook: lm.prefill(ids, observe=method) returns them")
  if room < 0:
    raise ValueError(f"room must be >= 0 free slots, got {room}")
  return _compress(method, cache, observations, extra=room, block=block)


__all__ = ["load", "generate", "compress", "methods", "Result", "KVCache", "LanguageModel"]
