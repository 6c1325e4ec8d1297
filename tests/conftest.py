import json
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# One XLA compilation cache on disk for the whole run: the pytest workers, and every subprocess
# the tests start, inherit the variable (set here, before any of them imports jax), so a program
# compiled once (the default model's prefill, the decode loop, ...) is loaded, not recompiled,
# by the next module or process. A run's own cache: it starts empty and is removed at the end.
_OWN_CACHE = ("JAX_COMPILATION_CACHE_DIR" not in os.environ
              and "PYTEST_XDIST_WORKER" not in os.environ)
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kvlab-test-xla-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# The suite compiles thousands of small programs and runs most of them once: LLVM's backend
# optimisations cost more time than they save (the Matryoshka training test: 50 s -> 32 s, its
# compiles 28 s -> 14 s). XLA's own graph passes (fusion, layout) still run, and the big matrix
# multiplies are library calls either way. Set before anything imports jax; the workers and the
# tests' subprocesses inherit it (tests/xla_env.py adds the device count to it, or drops it
# for the two long real-model subprocesses, where run time outweighs compile time). The suite
# also compiles with XLA CPU's classic emitters (xla_env.COMPILE_FLAG: 25-35 % less time per
# file, measured) where this jaxlib still has them, which every subprocess keeps.
from xla_env import COMPILE_FLAG, SUITE_FLAG, xla_accepts  # pylint: disable=g-import-not-at-top,wrong-import-position

for _flag in (SUITE_FLAG, COMPILE_FLAG):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", "") and (
      _flag == SUITE_FLAG or "PYTEST_XDIST_WORKER" not in os.environ and xla_accepts(_flag)):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()


# A run on a lent accelerator (experiments/gpu_checks.sh) cannot afford hypothesis's shrinking:
# every shrink step compiles a new kernel. That profile reports the first failing example as is.
if os.environ.get("KVLAB_HYPOTHESIS_PROFILE") == "device":
  from hypothesis import Phase, settings  # pylint: disable=g-import-not-at-top

  settings.register_profile("device", phases=[Phase.explicit, Phase.reuse, Phase.generate])
  settings.load_profile("device")


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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
  from kvlab import models  # pylint: disable=g-import-not-at-top

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


# The longest modules (minutes each on 2 cores, mostly XLA compiles; see `--durations`) run
# first, so that with `pytest -n 2 --dist loadfile` (``make test``) no worker is left with one
# of them at the end while the other idles.
_LONG_FIRST = ("test_notebook.py", "test_eval.py", "test_sharding.py", "test_fault.py",
               "test_calibration_outputs.py", "test_default_model.py", "test_memory.py",
               "test_matryoshka.py", "test_kvlab_api.py", "test_run_identity.py",
               "test_capacity.py", "test_lowrank.py", "test_kivi.py", "test_methods_budgets.py",
               "test_online.py", "test_kvquant.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONG_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


@pytest.fixture(scope="session")
def chat_tiny(tmp_path_factory, default_model):
  """Tiny random Llama with SmolLM2's vocabulary, tokenizer.json and chat template."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  d = tmp_path_factory.mktemp("chat_tiny")
  cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=2048,
                                 tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
  tok = default_model.tokenizer
  tok._tok.save(str(d / "tokenizer.json"))  # pylint: disable=protected-access
  json.dump({"chat_template": tok.chat_template, "bos_token": tok.bos_token,
             "eos_token": tok.eos_token}, open(d / "tokenizer_config.json", "w"))
  return str(d)
