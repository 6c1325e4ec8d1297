"""Launch configs: ml_collections config files that set a launcher's flags.

  python -m experiments.evaluate --config=experiments/configs/niah_n100.py --config.lengths=2048

A launcher calls ``define()`` beside its flags and ``apply()`` first in ``main``. A config file
has ``get_config()`` returning a flat ``ConfigDict``; each field names one of the launcher's
flags and sets it as if it were given on the command line:

- an unknown field stops the run with one error naming it and listing the launcher's flags;
- a flag given on the command line wins over the config's field (``--lengths=2048`` and
  ``--config.lengths=2048`` do the same), so one file serves a sweep;
- each value goes through the flag's own parser and validators: a bad value fails with the
  message the same value gets on the command line, before any work;
- a list flag takes a Python list or its comma string (write the comma string where
  ``--config.x=a,b`` should override it: config_flags overrides str fields, not lists);
- a field set to None leaves its flag at the default;
- a flag defined with ``required=True`` must still be given on the command line (absl checks it
  before ``main``).

The launcher keeps reading ``FLAGS``: the effective values are the flags' values.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_dict
from ml_collections import config_flags

# Flags of absl itself (help, logging, pdb, flagfile): not a launcher's settings.
_FRAMEWORK_PREFIXES = ("absl.",)


class ConfigError(flags.Error):
  """A config that cannot set the launcher's flags."""


def define(name: str = "config", flag_values=flags.FLAGS) -> None:
  """Defines ``--<name>``: an ml_collections config file whose fields set this launcher's flags
  (``--<name>.field=value`` overrides one field)."""
  config_flags.DEFINE_config_file(
      name, None, "Config file (experiments/configs/*.py, get_config() -> ConfigDict) whose "
      "fields set this launcher's flags; a flag given on the command line wins; "
      f"--{name}.field=value overrides a field.", flag_values=flag_values)
  flag_values.register_key_flag_for_module(sys.argv[0], flag_values[name])


def launcher_flags(name: str = "config", flag_values=flags.FLAGS) -> list[str]:
  """The flags a config may set: every defined flag but absl's own and the config's."""
  out = set()
  for module, defined in flag_values.flags_by_module_dict().items():
    if module.startswith(_FRAMEWORK_PREFIXES):
      continue
    out.update(f.name for f in defined)
  return sorted(n for n in out if n != name and not n.startswith(name + "."))


def _launcher() -> str:
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  return spec.name if spec is not None and spec.name else os.path.basename(sys.argv[0])


def _argument(flag, value):
  """``value`` as the flag's parser takes it: strings, or a list of strings for a list flag."""
  is_list = isinstance(flag, flags.MultiFlag) or isinstance(flag.parser, flags.BaseListParser)
  if isinstance(value, (list, tuple)):
    if not is_list:
      raise ConfigError(f"flag --{flag.name}={list(value)}: a list, but --{flag.name} takes "
                        "one value")
    return [_argument_text(v) for v in value]
  return _argument_text(value)


def _argument_text(value) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  return str(value)


def apply_config(name: str = "config", flag_values=flags.FLAGS) -> dict:
  """Sets the flags from the parsed ``--<name>`` config; returns ``{field: value}`` of the
  fields applied (the command line's flags win). Raises ``ConfigError`` / ``flags.Error``."""
  config = flag_values[name].value
  if not flag_values[name].present:
    return {}
  path = config_flags.get_config_filename(flag_values[name])
  try:
    fields = dict(config.items())
  except (IOError, OSError) as e:  # config_flags defers a missing file's error to here
    raise ConfigError(f"--{name}={path}: cannot read it ({e})") from e
  except AttributeError as e:
    raise ConfigError(f"--{name}={path}: get_config() returned {type(config).__name__}, not "
                      "an ml_collections.ConfigDict") from e
  known = launcher_flags(name, flag_values)
  for field, value in fields.items():
    if field not in known:
      raise ConfigError(f"--{name}={path}: field {field!r} is not a flag of {_launcher()}; "
                        f"its flags: {', '.join(known)}")
    if isinstance(value, config_dict.ConfigDict):
      raise ConfigError(f"--{name}={path}: field {field!r} is a nested ConfigDict; a launch "
                        "config is flat, one field per flag")
  given = {f for f in fields if flag_values[f].present}  # the command line wins
  applied = {}
  for field, value in fields.items():
    if field in given or value is None:
      continue
    flag = flag_values[field]
    flag.parse(_argument(flag, value))
    applied[field] = value
  flag_values.validate_all_flags()
  return applied


def apply(name: str = "config", flag_values=flags.FLAGS) -> None:
  """``apply_config`` for the top of a launcher's ``main``: an error is reported the way absl
  reports a bad command-line flag, and the launcher exits before any work."""
  try:
    apply_config(name, flag_values)
  except flags.Error as e:
    message = str(e)
    if f"--{name}=" not in message:  # a flag's own error: say where its value came from
      message += f" (from --{name}={config_flags.get_config_filename(flag_values[name])})"
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)
