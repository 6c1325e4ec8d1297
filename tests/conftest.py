import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
  """Returns ``make(name) -> (path, torch_model)``; each tiny checkpoint is built once."""
  from tiny_checkpoints import make_checkpoint  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("tiny")
  built = {}

  def make(name):
    if name not in built:
      path = str(root / name)
      built[name] = (path, make_checkpoint(name, path))
    return built[name]

  return make


@pytest.fixture(scope="session")
def default_model():
  """The embedded default model (SmolLM2-135M-Instruct GGUF), loaded once, fp32."""
  import models  # pylint: disable=g-import-not-at-top

  return models.load("smollm2-135m", progress=False)


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
  """Drops compiled executables after each test module. One pytest process compiles thousands
  of programs; with this session's added modules, XLA's CPU compiler segfaulted in the Pallas
  kernel tests late in the full run (never when those ran alone), which points at accumulated
  executables; clearing them per module keeps the process small."""
  yield
  import jax  # pylint: disable=g-import-not-at-top
  jax.clear_caches()
