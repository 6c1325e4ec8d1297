"""Compression methods on the one cache pytree, a registry of names and ``Compose``.

  method = methods.make("snapkv", ratio=0.5)
  logits, cache, obs = prefill(..., observe=method.observe)
  cache = methods.compress(method, cache, obs, extra=room_for_question_and_answer)
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from kvlab.lib.methods.base import (Method, MethodWarning, compress, example, field_types, select,
                              size_warning)
from kvlab.lib.methods.accumulated import H2O, Keyformer
from kvlab.lib.methods.budgets import AdaKV, PyramidKV
from kvlab.lib.methods.eviction import Knorm, SnapKV, StreamingLLM, TOVA
from kvlab.lib.methods.expected_attention import ExpectedAttention
from kvlab.lib.methods.kivi import KIVI, KIVI4
from kvlab.lib.methods.kvquant import KVQuant, KVQuant2, KVQuant4
from kvlab.lib.methods.kvzip import KVzip
from kvlab.lib.methods.kvzip_heads import KVzipHeads
from kvlab.lib.methods.matryoshka import MatryoshkaKV, MatryoshkaPCA
from kvlab.lib.methods.minicache import MiniCache
from kvlab.lib.methods.think import ThinK
from kvlab.lib.methods.xkv import XKV

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

  Observations from prefill are shared: every member's ``observe`` runs in the same pass. An
  evicting member keeps its ``ratio`` of what it receives, so the prompt's kept fraction is
  the product of the members' ratios (``kept_fraction``).
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


def _options(part: str) -> tuple[str, dict[str, str]]:
  """``"minicache:start=0:retain=0.1"`` -> ``("minicache", {"start": "0", "retain": "0.1"})``:
  the values as written (``make`` types them by the method's fields)."""
  name, *opts = [o.strip() for o in part.split(":")]
  out: dict[str, str] = {}
  for o in opts:
    key, eq, val = (x.strip() for x in o.partition("="))
    if not eq or not key or not val:
      raise ValueError(f"bad method option {o!r} in {part!r}: write name:key=value, e.g. "
                       "minicache:start=0.25")
    if key in out:
      raise ValueError(f"method option {key} is given twice in {part!r}: give it once")
    out[key] = val
  return name, out


_INT = re.compile(r"[+-]?\d+")


def _finite_float(raw: str) -> float | None:
  """``raw`` as a finite float, or None when it is not one."""
  try:
    v = float(raw)
  except ValueError:
    return None
  return v if math.isfinite(v) else None


def _typed(cls, key: str, raw: str):
  """Option ``key=raw`` of method ``cls`` as its field's type: an int field takes a whole
  number, a float field any number, a bool field true/false, an optional field also none."""
  types = field_types(cls)[key]
  low = raw.lower()
  if "None" in types and low == "none":
    return None
  if "bool" in types:
    if low in ("true", "false"):
      return low == "true"
    kind = "true or false"
  elif "int" in types:
    if _INT.fullmatch(raw):
      return int(raw)
    kind = "a whole number"
  elif "float" in types:
    kind = "a number"
    v = _finite_float(raw)
    if v is not None:
      return v
  else:
    return raw
  raise ValueError(f"{cls.name}: option {key}={raw} must be {kind}: e.g. "
                   f"--method={cls.name}:{key}={example(cls, key)}")


def _member_parts(spec: str) -> list[str]:
  """The members of ``"a+b"`` (stripped); raises on an empty spec or an empty member."""
  parts = [p.strip() for p in spec.split("+")]
  if not any(parts):
    raise ValueError("empty method name: pass e.g. --method=snapkv")
  if not all(parts):
    raise ValueError(f"method spec {spec!r} has an empty member (a '+' with no method on one "
                     f"side): join method names with single '+', e.g. snapkv+kivi")
  return parts


def evicts(method) -> bool:
  """True for a member that drops tokens (takes ``ratio`` / ``budget``); quantizers and low-rank
  methods (KIVI, KVQuant, ThinK, xKV, MatryoshkaKV, MiniCache) keep every token."""
  return isinstance(method, Method)


def kept_fraction(method) -> float | None:
  """The nominal fraction of the prompt's tokens ``method`` keeps: the product of its evicting
  members' ratios (each keeps its ratio of what the one before kept: ``kvzip:ratio=0.7+snapkv``
  at 0.5 keeps 0.7 x 0.5 = 0.35); 1.0 for quantizers and low-rank methods alone; None where a member
  has a token ``budget`` instead (the fraction then depends on the prompt's length). Record it
  next to the ratio a row is labelled with."""
  frac = 1.0
  for m in getattr(method, "methods", (method,)):
    if evicts(m):
      if m.ratio is None:
        return None
      frac *= m.ratio
  return frac


def make(spec: str, **kwargs) -> Method | Compose:
  """``make("snapkv", ratio=0.5)``; ``"a+b"`` composes (each gets the same kwargs it accepts);
  ``"name:key=value"`` sets one member's own option (``"snapkv+matryoshka:rank=0.25"``),
  checked against the field's type (int, float, true/false) and range here, before any model
  loads.

  In a composition each evicting member keeps its ``ratio`` of what it receives, so two
  evicting members at the shared ratio would keep its square under its label: refused. A
  member's own ``ratio`` option is the fraction it keeps of what it receives and replaces the
  shared one for that member: ``make("kvzip:ratio=0.7+snapkv", ratio=0.5)`` keeps 0.7 x 0.5 =
  0.35 of the prompt (``kept_fraction``, for the row to record).
  """
  parts = _member_parts(spec)
  built, shared = [], []  # shared: indices of the evicting members at the shared ratio
  for i, p in enumerate(parts):
    p, raw = _options(p)
    if p not in REGISTRY:
      raise ValueError(f"unknown method {p!r}; known: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[p]
    names = {f.name for f in dataclasses.fields(cls)}
    if set(raw) - names:
      raise ValueError(f"{p} does not take {sorted(set(raw) - names)}; it takes "
                       f"{sorted(names)}")
    own = {k: _typed(cls, k, v) for k, v in raw.items()}
    if len(parts) == 1 and "ratio" not in names and kwargs.get("ratio") not in (None, 1.0):
      raise ValueError(f"{p} keeps every token (it saves bits, not tokens): use ratio 1.0, or "
                       f"compose it after an eviction method, e.g. snapkv+{p}")
    kwargs_p = {k: v for k, v in kwargs.items() if not (k == "ratio" and "ratio" not in names)}
    unknown = set(kwargs_p) - names
    if len(parts) == 1 and unknown:
      raise ValueError(f"{p} does not take {sorted(unknown)}; it takes {sorted(names)}")
    if "ratio" in names and not {"ratio", "budget"} & set(own):
      shared.append(i)
    kwargs_p = {**kwargs_p, **own}
    built.append(cls(**{k: v for k, v in kwargs_p.items() if k in names}))
  if len(built) == 1:
    return built[0]
  out = Compose(tuple(built))  # checks the members' order first
  ratio = kwargs.get("ratio")
  if len(shared) > 1 and ratio is not None and ratio < 1.0:
    own = f"{ratio ** 0.5:.2g}"
    fix = "+".join(p + (f":ratio={own}" if i in shared[:-1] else "")
                   for i, p in enumerate(parts))
    raise ValueError(
        f"{spec} at ratio {ratio:g}: {len(shared)} members evict tokens "
        f"({', '.join(built[i].name for i in shared)}) and each keeps {ratio:g} of what it "
        f"receives, so the cache would keep {' x '.join([f'{ratio:g}'] * len(shared))} = "
        f"{kept_fraction(out):.3g} of the prompt under the label {ratio:g}: give all but one "
        f"of them its own ratio (the fraction it keeps of what it receives), e.g. {fix} (keeps "
        f"{float(own) ** (len(shared) - 1) * ratio:.3g}; methods.kept_fraction), or use one "
        f"eviction method")
  return out


# One line per built-in method for ``available()`` (a user method gives its ``summary``).
DESCRIPTIONS = {
    "streaming_llm": "StreamingLLM: attention sinks + the most recent tokens (evicts, prefill)",
    "knorm": "Knorm: keeps the keys with the smallest L2 norm (evicts, prefill)",
    "snapkv": "SnapKV: the last window's queries vote, pooled (evicts, prefill)",
    "tova": "TOVA: the last query's attention, one token set per layer (evicts, prefill+decode)",
    "h2o": "H2O: accumulated attention heavy hitters + recent (evicts, prefill+decode)",
    "keyformer": "Keyformer: Gumbel-softmax accumulated scores + recent (evicts, prefill+decode)",
    "pyramidkv": "PyramidKV: SnapKV with budgets shrinking with depth (evicts, prefill)",
    "adakv": "Ada-KV: head-adaptive budgets around a scorer (evicts, prefill)",
    "expected_attention": "Expected attention of future queries from query statistics (evicts)",
    "kvzip": "KVzip: the model repeats the context; keeps what the repeat attends to (evicts)",
    "kvzip_heads": "KVzip head-level: calibrated heads keep all, others sinks + window (evicts)",
    "kivi": "KIVI: 2-bit keys per channel, values per token, fp recent window (quantizes)",
    "kivi4": "KIVI with 4-bit keys and values (quantizes)",
    "kvquant": "KVQuant: pre-RoPE per-channel keys, non-uniform 3-bit LUTs, outliers (quantizes)",
    "kvquant2": "KVQuant at 2 bits (quantizes)",
    "kvquant4": "KVQuant at 4 bits (quantizes)",
    "xkv": "xKV: cross-layer shared SVD bases of keys and values (low rank)",
    "think": "ThinK: prunes the least important key channels (low rank)",
    "matryoshka": "MatryoshkaKV: trained orthogonal projections cut to a rank (low rank)",
    "matryoshka_pca": "MatryoshkaKV with the PCA projections (low rank)",
    "minicache": "MiniCache: merges adjacent deep layers' caches by SLERP (depth merging)",
}


def available() -> dict[str, str]:
  """``{name: one-line description}`` of every registered method (built-in and registered by
  ``register``), sorted by name."""
  out = {}
  for name in sorted(REGISTRY):
    cls = REGISTRY[name]
    doc = " ".join((cls.__doc__ or cls.__name__).split())
    out[name] = getattr(cls, "summary", None) or DESCRIPTIONS.get(name) or doc.split(". ")[0]
  return out


def register(name: str, *, replace: bool = False):
  """Class decorator adding a user method to the registry, so ``make(name)`` and every
  launcher's ``--method=name`` (with ``--method_module=your_module``) build it.

  The class must be a frozen dataclass (a static ``jit`` argument) defining ``scores(cache,
  obs) -> [L, B, K, S]`` (or ``compress``/``apply``); ``replace=True`` overrides a registered
  name."""
  if not name or not name.replace("_", "").isalnum():
    raise ValueError(f"method name must be letters, digits and _, got {name!r}")

  def deco(cls):
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
      raise TypeError(f"{cls.__name__}: a method must be a frozen dataclass "
                      "(@dataclasses.dataclass(frozen=True)) so it can be a static jit argument")
    if not any(hasattr(cls, h) for h in ("scores", "compress", "apply")):
      raise TypeError(f"{cls.__name__}: define scores(cache, obs) -> [L, B, K, S] keep-scores")
    if name in REGISTRY and REGISTRY[name] is not cls and not replace:
      raise ValueError(f"method {name!r} is already registered ({REGISTRY[name].__name__}): "
                       "pick another name, or pass replace=True")
    REGISTRY[name] = cls
    return cls
  return deco


def check_for_model(method, config, params, what: str = "the model") -> None:
  """Raises a clear error if a calibrated member of ``method`` (KVQuant, MatryoshkaKV) was
  calibrated on another model than the one with this ``config`` and ``params`` (fingerprints
  over every weight, ``lib.fingerprint``). ``what`` names the model in the error: pass its name
  and source path, e.g. ``f"{name} ({lm.source})"``."""
  from kvlab.lib.fingerprint import model_fingerprint  # pylint: disable=g-import-not-at-top
  for m in getattr(method, "methods", (method,)):
    if hasattr(m, "check_for"):
      m.check_for(config, params, what)
    if hasattr(m, "load_calibration"):
      cal = m.load_calibration()
      cal.check_shapes(config.num_layers, config.num_kv_heads, config.head_dim)
      cal.check_model(model_fingerprint(config, params), what)


__all__ = ["available", "register", "check_for_model", "Method", "Compose", "REGISTRY", "make", "compress", "select",
           "kept_fraction", "evicts", "size_warning", "MethodWarning", "StreamingLLM", "Knorm",
           "SnapKV", "TOVA", "H2O", "Keyformer", "PyramidKV", "AdaKV", "ExpectedAttention",
           "KVzip", "KIVI", "KIVI4", "KVQuant", "KVQuant2", "KVQuant4", "XKV", "ThinK",
           "MatryoshkaKV", "MatryoshkaPCA", "MiniCache"]
