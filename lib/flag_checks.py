"""Parse-time checks of launcher flags (absl validators): a bad value is refused, naming the
flag and the fix, before a model loads or an output file is opened.

  flag_checks.int_list("lengths", minimum=1)
  flag_checks.float_list("ratio", low=0.0, high=1.0, low_open=True)
  flag_checks.method_specs("method", "ratio")

Each function registers a validator on ``flags.FLAGS`` (or ``flag_values``); absl then reports
``flag --lengths=abc: ...`` and exits with a usage error.
"""

from __future__ import annotations

from typing import Callable, Sequence

from absl import flags


def _register(name: str, check: Callable, flag_values) -> None:
  def checker(value):
    if value is None:
      return True
    msg = check(value)
    if msg:
      raise flags.ValidationError(msg)
    return True
  flags.register_validator(name, checker, flag_values=flag_values)


def _duplicates(items: Sequence) -> list:
  seen, dup = set(), []
  for x in items:
    if x in seen and x not in dup:
      dup.append(x)
    seen.add(x)
  return dup


def int_list(name: str, *, minimum: int = 1, unique: bool = True,
             flag_values=flags.FLAGS) -> None:
  """A comma list of integers, each >= ``minimum`` (and no repeats if ``unique``)."""
  def check(values):
    if not values:
      return f"give at least one value, e.g. --{name}=1024"
    out = []
    for v in values:
      try:
        out.append(int(v))
      except ValueError:
        return f"{v!r} is not an integer: e.g. --{name}=1024,2048"
    bad = [v for v in out if v < minimum]
    if bad:
      return f"{bad[0]} is below the minimum of {minimum}"
    if unique and _duplicates(out):
      return f"{_duplicates(out)[0]} is listed twice: each value makes its own rows"
    return None
  _register(name, check, flag_values)


def float_list(name: str, *, low: float, high: float, low_open: bool = False,
               high_open: bool = False, unique: bool = True, example: str = "0.25,0.5",
               allow_empty: bool = False, flag_values=flags.FLAGS) -> None:
  """A comma list of floats in the interval ``low..high`` (bounds open where said)."""
  lo_b, hi_b = "(" if low_open else "[", ")" if high_open else "]"

  def check(values):
    if not values:
      return None if allow_empty else f"give at least one value, e.g. --{name}={example}"
    out = []
    for v in values:
      try:
        out.append(float(v))
      except ValueError:
        return f"{v!r} is not a number: e.g. --{name}={example}"
    for x in out:
      if (x < low or x > high or (low_open and x == low) or (high_open and x == high)
          or x != x):
        return f"{x:g} is outside {lo_b}{low:g}, {high:g}{hi_b}: e.g. --{name}={example}"
    if unique and _duplicates(out):
      return f"{_duplicates(out)[0]:g} is listed twice: each value makes its own rows"
    return None
  _register(name, check, flag_values)


def choice_list(name: str, allowed: Sequence[str], *,
                unavailable: Callable[[str], str | None] | None = None,
                flag_values=flags.FLAGS) -> None:
  """A comma list of names from ``allowed``, no repeats; ``unavailable(name)`` (optional) says
  why a known name cannot be used on this machine (None when it can)."""
  def check(values):
    if not values:
      return f"give at least one of {', '.join(allowed)}"
    for v in values:
      if v not in allowed:
        return f"unknown {v!r}; known: {', '.join(allowed)}"
    if _duplicates(values):
      return f"{_duplicates(values)[0]} is listed twice"
    for v in values:
      why = unavailable(v) if unavailable else None
      if why:
        return why
    return None
  _register(name, check, flag_values)


def at_least(name: str, minimum: int, *, why: str = "", flag_values=flags.FLAGS) -> None:
  """An integer flag >= ``minimum``."""
  def check(value):
    if value < minimum:
      return f"must be >= {minimum}, got {value}" + (f" ({why})" if why else "")
    return None
  _register(name, check, flag_values)


def in_range(name: str, low: float, high: float, *, flag_values=flags.FLAGS) -> None:
  """A number flag in ``[low, high]``."""
  def check(value):
    if not low <= value <= high:
      return f"must be in [{low:g}, {high:g}], got {value:g}"
    return None
  _register(name, check, flag_values)


def utf8_text(name: str, *, flag_values=flags.FLAGS) -> None:
  """A string flag that is valid UTF-8 (a shell passes undecodable bytes through as lone
  surrogates, which tokenizers refuse with an unrelated error)."""
  def check(value):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError as e:
      raw = value.encode("utf-8", "surrogateescape")
      return (f"is not valid UTF-8 text (byte 0x{raw[e.start]:02x} at position {e.start}): "
              "pass UTF-8, e.g. convert the file with iconv -t utf-8")
    return None
  _register(name, check, flag_values)


def define_method_module(flag_values=flags.FLAGS) -> None:
  """Defines ``--method_module``: Python modules imported before the method flags are
  checked, so methods they register (``kvlab.methods.register``) work as ``--method=name``."""
  flags.DEFINE_list("method_module", [], "Modules to import first (comma list, e.g. "
                    "my_methods): their kvlab.methods.register(...) classes become --method "
                    "names.", flag_values=flag_values)


def import_method_modules(names: Sequence[str]) -> None:
  """Imports each module of ``names`` (raising one clear error naming a missing one)."""
  import importlib  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  if os.getcwd() not in sys.path and "" not in sys.path:
    sys.path.insert(0, os.getcwd())  # a module beside the user's command line
  for name in names:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ValueError(f"--method_module={name}: cannot import it ({e}): give a module on the "
                       "Python path or in the current folder, e.g. my_methods for "
                       "./my_methods.py") from e


def method_specs(method_flag: str, ratio_flag: str | None = None, *, unique: bool = True,
                 optional: bool = False, flag_values=flags.FLAGS) -> None:
  """Every spec of a method flag (a string or a comma list) builds with ``lib.methods.make``
  at each ratio of ``ratio_flag`` (a float or a comma list): unknown names, bad options and
  meaningless compositions are refused at parse time. ``unique``: no spec twice."""
  from kvlab.lib import methods  # pylint: disable=g-import-not-at-top

  def check(d):
    if d.get("method_module"):
      try:
        import_method_modules(d["method_module"])
      except ValueError as e:
        return str(e)
    specs = d[method_flag]
    if specs is None or specs == "":
      return None if optional else f"--{method_flag}: give a method, e.g. snapkv"
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
      return f"--{method_flag}: give at least one method, e.g. snapkv"
    if unique and _duplicates(specs):
      return (f"--{method_flag}: {_duplicates(specs)[0]} is listed twice: each spec is one "
              "cell; list it once")
    ratios = [None]
    if ratio_flag is not None:
      r = d[ratio_flag]
      try:
        ratios = [float(x) for x in ([r] if not isinstance(r, (list, tuple)) else r)]
      except (TypeError, ValueError):
        return None  # the ratio flag's own validator names it
    for spec in specs:
      for ratio in ratios:
        try:
          methods.make(spec, **({} if ratio is None else {"ratio": ratio}))
        except (ValueError, TypeError) as e:
          return f"--{method_flag}={spec}" + (f" at ratio {ratio:g}" if ratio is not None
                                              else "") + f": {e}"
    return None

  names = [method_flag] + ([ratio_flag] if ratio_flag else [])
  if "method_module" in flag_values:
    names.append("method_module")

  def checker(d):
    msg = check(d)
    if msg:
      raise flags.ValidationError(msg)
    return True
  flags.register_multi_flags_validator(names, checker, flag_values=flag_values)
