"""Compression methods on the one cache pytree, a registry of names and ``Compose``.

  method = methods.make("snapkv", ratio=0.5)
  logits, cache, obs = prefill(..., observe=method.observe)
  cache = methods.compress(method, cache, obs, extra=room_for_question_and_answer)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lib.methods.base import Method, compress, select
from lib.methods.accumulated import H2O, Keyformer
from lib.methods.budgets import AdaKV, PyramidKV
from lib.methods.eviction import Knorm, SnapKV, StreamingLLM, TOVA
from lib.methods.expected_attention import ExpectedAttention
from lib.methods.kivi import KIVI, KIVI4
from lib.methods.kvquant import KVQuant, KVQuant2, KVQuant4
from lib.methods.kvzip import KVzip
from lib.methods.kvzip_heads import KVzipHeads
from lib.methods.matryoshka import MatryoshkaKV, MatryoshkaPCA
from lib.methods.minicache import MiniCache
from lib.methods.think import ThinK
from lib.methods.xkv import XKV

REGISTRY: dict[str, type[Method]] = {
    "streaming_llm": StreamingLLM,
    "knorm": Knorm,
    "snapkv": SnapKV,
    "tova": TOVA,
    "h2o": H2O,
    "keyformer": Keyformer,
    "pyramidkv": PyramidKV,
    "adakv": AdaKV,
    "expected_attention": ExpectedAttention,
    "kvzip": KVzip,
    "kvzip_heads": KVzipHeads,
    "kivi": KIVI,
    "kivi4": KIVI4,
    "kvquant": KVQuant,
    "kvquant2": KVQuant2,
    "kvquant4": KVQuant4,
    "xkv": XKV,
    "think": ThinK,
    "matryoshka": MatryoshkaKV,
    "matryoshka_pca": MatryoshkaPCA,
    "minicache": MiniCache,
}


@dataclasses.dataclass(frozen=True)
class Compose:
  """Applies methods in order (``snapkv+kivi``): each compresses what the previous kept.

  Observations from prefill are shared: every member's ``observe`` runs in the same pass.
  """

  methods: tuple[Method, ...]
  name = "compose"

  def __post_init__(self):
    names = [m.name for m in self.methods]
    for i, m in enumerate(self.methods[1:], 1):
      if getattr(m, "reconstructs", False) or getattr(getattr(m, "inner", None),
                                                       "reconstructs", False):
        raise ValueError(f"invalid order {'+'.join(names)}: {names[i]} scores the context "
                         f"by having the model repeat it, so it must come first, e.g. "
                         f"{'+'.join([names[i]] + names[:i] + names[i + 1:])}")
    for i, m in enumerate(self.methods[:-1]):
      if getattr(m, "quantizes", False):
        raise ValueError(f"invalid order {'+'.join(names)}: quantization / low-rank "
                         f"({m.name}) must come last — evict first, then quantize what is "
                         f"kept, e.g. "
                         f"{'+'.join(names[:i] + names[i + 1:] + [m.name])}")

  @property
  def observe(self):
    hooks = tuple(m.observe for m in self.methods)
    if not any(h is not None for h in hooks):
      return None
    return _joint_observe(hooks)

  def apply(self, cache, observations, *, extra=0, block=512):
    for i, m in enumerate(self.methods):
      obs = None if observations is None else observations[i]
      last = i == len(self.methods) - 1
      cache = compress(m, cache, obs, extra=extra if last else 0, block=block, final=last)
    return cache


_JOINT: dict[tuple, Any] = {}


def _joint_observe(hooks):
  """One observe hook running several (cached so the object is stable under jit)."""
  if hooks not in _JOINT:
    def observe(*args):
      return tuple(None if h is None else h(*args) for h in hooks)
    observe.wants_probs = any(getattr(h, "wants_probs", False) for h in hooks)
    specs = {getattr(h, "wants_gumbel_probs", None) for h in hooks} - {None}
    # One Gumbel buffer: with several Keyformer settings, each hook makes its own pass.
    observe.wants_gumbel_probs = specs.pop() if len(specs) == 1 else None
    _JOINT[hooks] = observe
  return _JOINT[hooks]


def _options(part: str) -> tuple[str, dict[str, Any]]:
  """``"minicache:start=0:retain=0.1"`` -> ``("minicache", {"start": 0.0, "retain": 0.1})``."""
  name, *opts = [o.strip() for o in part.split(":")]
  out: dict[str, Any] = {}
  for o in opts:
    key, eq, val = o.partition("=")
    if not eq or not key:
      raise ValueError(f"bad method option {o!r} in {part!r}: write name:key=value, e.g. "
                       "minicache:start=0.25")
    low = val.lower()
    if low in ("true", "false"):
      out[key] = low == "true"
    else:
      try:
        out[key] = int(val) if val.lstrip("-").isdigit() else float(val)
      except ValueError:
        out[key] = val
  return name, out


def make(spec: str, **kwargs) -> Method | Compose:
  """``make("snapkv", ratio=0.5)``; ``"a+b"`` composes (each gets the same kwargs it accepts);
  ``"name:key=value"`` sets one member's own option (``"snapkv+matryoshka:rank=0.25"``)."""
  parts = [p.strip() for p in spec.split("+") if p.strip()]
  if not parts:
    raise ValueError("empty method name: pass e.g. --method=snapkv")
  built = []
  for p in parts:
    p, own = _options(p)
    if p not in REGISTRY:
      raise ValueError(f"unknown method {p!r}; known: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[p]
    names = {f.name for f in dataclasses.fields(cls)}
    if len(parts) == 1 and "ratio" not in names and kwargs.get("ratio") not in (None, 1.0):
      raise ValueError(f"{p} keeps every token (it saves bits, not tokens): use ratio 1.0, or "
                       f"compose it after an eviction method, e.g. snapkv+{p}")
    kwargs_p = {k: v for k, v in kwargs.items() if not (k == "ratio" and "ratio" not in names)}
    unknown = set(kwargs_p) - names
    if len(parts) == 1 and unknown:
      raise ValueError(f"{p} does not take {sorted(unknown)}; it takes {sorted(names)}")
    if set(own) - names:
      raise ValueError(f"{p} does not take {sorted(set(own) - names)}; it takes "
                       f"{sorted(names)}")
    kwargs_p = {**kwargs_p, **own}
    built.append(cls(**{k: v for k, v in kwargs_p.items() if k in names}))
  return built[0] if len(built) == 1 else Compose(tuple(built))


def check_for_model(method, config, params, what: str = "the model") -> None:
  """Raises a clear error if a calibrated member of ``method`` (KVQuant, MatryoshkaKV) was
  calibrated on another model than the one with this ``config`` and ``params``."""
  from lib.quant.kvquant_calibrate import model_fingerprint  # pylint: disable=g-import-not-at-top
  for m in getattr(method, "methods", (method,)):
    if hasattr(m, "check_for"):
      m.check_for(config, params, what)
    if hasattr(m, "load_calibration"):
      cal = m.load_calibration()
      cal.check_shapes(config.num_layers, config.num_kv_heads, config.head_dim)
      cal.check_model(model_fingerprint(config, params), what)


__all__ = ["check_for_model", "Method", "Compose", "REGISTRY", "make", "compress", "select", "StreamingLLM", "Knorm",
           "SnapKV", "TOVA", "H2O", "Keyformer", "PyramidKV", "AdaKV", "ExpectedAttention", "KVzip", "KIVI",
           "KIVI4", "KVQuant", "KVQuant2", "KVQuant4", "XKV", "ThinK", "MatryoshkaKV",
           "MatryoshkaPCA", "MiniCache"]
