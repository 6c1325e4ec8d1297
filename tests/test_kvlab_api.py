"""The public face: ``import kvlab``, the one call, the low-level path on the model object,
user methods registered from outside the library, and capacity safety (issue 33)."""

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvlab
from kvlab.lib import generate as gen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  path, _ = tiny_dir("llama")
  return kvlab.load(path, progress=False, attn_block_size=8)


def test_methods_are_listed_with_one_line_each():
  names = kvlab.methods.available()
  assert {"snapkv", "kvzip", "kivi", "matryoshka", "streaming_llm"} <= set(names)
  assert all(desc and "\n" not in desc and len(desc) < 120 for desc in names.values())
  assert isinstance(kvlab.methods.make("snapkv+kivi", ratio=0.5), kvlab.methods.Compose)


def _prefill(lm, ids):
  cache = lm.new_cache(1, len(ids))
  tokens, lengths = gen.pad_batch([ids], 8)
  return gen.prefill(lm.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                     apply_fn=lm.apply_fn, chunk_size=8)


def test_decoding_past_the_room_raises_instead_of_overwriting(tiny):
  """The 121-in-48 case: a cache compressed with no room, then a decode loop of 121 tokens,
  silently wrote over its last slots (and the answer degraded); now it raises, naming room."""
  ids = list(np.random.RandomState(0).randint(0, 160, size=96))
  m = kvlab.methods.make("knorm", ratio=0.5)
  logits, cache, _ = _prefill(tiny, ids)
  small = kvlab.compress(m, cache, None, room=0)
  assert small.free_slots() < 121
  with pytest.raises(ValueError, match="free slots.*decoding 121 tokens.*room"):
    gen.decode_loop(tiny.params, small, logits, jax.random.PRNGKey(0), apply_fn=tiny.apply_fn,
                    max_new_tokens=121)
  with pytest.raises(ValueError, match="free slots.*decoding 121 tokens"):  # sampled too
    gen.decode_loop(tiny.params, small, logits, jax.random.PRNGKey(0), apply_fn=tiny.apply_fn,
                    max_new_tokens=121, sampling=gen.SamplingConfig(temperature=1.0))
  full = small.resize(small.capacity)  # no free slot at all: one decode step is refused
  full = full.replace(lengths=jnp.full_like(full.lengths, full.capacity))
  with pytest.raises(ValueError, match="0 free slots.*a decode step"):
    gen.decode_step(tiny.params, jnp.zeros((1,), jnp.int32), full, apply_fn=tiny.apply_fn)
  with pytest.raises(ValueError, match="padded prompt of 96 tokens"):
    _, _, _ = gen.prefill(tiny.params, jnp.zeros((1, 96), jnp.int32),
                          jnp.asarray([96], jnp.int32), small, apply_fn=tiny.apply_fn,
                          chunk_size=8)
  # With room, the same loop runs; a decode-time evicting method needs one free slot only.
  roomy = kvlab.compress(m, cache, None, room=128)
  out, n, _ = gen.decode_loop(tiny.params, roomy, logits, jax.random.PRNGKey(0),
                              apply_fn=tiny.apply_fn, max_new_tokens=121)
  assert int(n[0]) == 121


def test_a_method_that_needs_observations_says_so(tiny):
  ids = list(np.random.RandomState(1).randint(0, 160, size=40))
  m = kvlab.methods.make("snapkv", ratio=0.5)
  cache, obs = tiny.prefill(ids, observe=m)
  with pytest.raises(ValueError, match="snapkv needs the observations.*lm.prefill"):
    kvlab.compress(m, cache, None, room=8)
  small = kvlab.compress(m, cache, obs, room=8)
  assert small.trimmed().nbytes < cache.trimmed().nbytes
  answer = tiny.decode(small, ids[:3], max_new_tokens=4)
  assert len(answer[0]) == 4
  with pytest.raises(ValueError, match="too small"):  # question + answer past the room
    tiny.decode(kvlab.compress(m, cache, obs, room=8), ids[:3], max_new_tokens=40)


def test_generate_one_call(chat_tiny):
  lm = kvlab.load(chat_tiny, progress=False)
  ctx = "The vault code is 4812. " + "The fields were green. " * 30
  full = kvlab.generate(lm, ctx, "What is the vault code?", max_new_tokens=4)
  r = kvlab.generate(lm, ctx, "What is the vault code?", method="snapkv", ratio=0.5,
                     max_new_tokens=4)
  assert r.method == "snapkv" and r.kept_fraction == 0.5 and len(r.tokens) <= 4
  assert r.cache_bytes < 0.6 * r.full_bytes and full.cache_bytes == full.full_bytes
  assert r.full_bytes == full.full_bytes and r.context_tokens == full.context_tokens
  rs = kvlab.generate(lm, [ctx, ctx[:200]], ["Code?", "Code?"], method="knorm", ratio=0.25,
                      max_new_tokens=2)
  assert len(rs) == 2 and rs[1].context_tokens < rs[0].context_tokens
  online = kvlab.generate(lm, ctx, "What is the vault code?", method="snapkv", ratio=0.5,
                          max_new_tokens=4, compress_during_prefill=True, chunk_size=64)
  assert online.cache_bytes < online.full_bytes
  with pytest.raises(ValueError, match="kvzip\\+snapkv"):
    kvlab.generate(lm, ctx, "Code?", method="kvzip+snapkv", ratio=0.5)


_USER_MODULE = textwrap.dedent('''
    import dataclasses
    import jax.numpy as jnp
    import kvlab

    @kvlab.methods.register("keep_oldest")
    @dataclasses.dataclass(frozen=True)
    class KeepOldest(kvlab.methods.Method):
      """Keeps the oldest tokens (a test method)."""
      name = "keep_oldest"

      def scores(self, cache, obs=None):
        return -cache.positions.astype(jnp.float32)
''')


def test_user_method_registered_from_a_module_runs_in_evaluate(chat_tiny, tmp_path):
  (tmp_path / "my_methods.py").write_text(_USER_MODULE)
  out = tmp_path / "rows.jsonl"
  env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
  cmd = [sys.executable, "-m", "experiments.evaluate", f"--model={chat_tiny}", "--lengths=200",
         "--num_samples=1", "--method_module=my_methods", "--method=keep_oldest",
         "--ratio=0.5", "--max_new_tokens=4", f"--out={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [r for r in map(eval_json, out.read_text().splitlines())]
  mine = [r for r in rows if r["method"] == "keep_oldest"]
  assert len(mine) == 1 and mine[0]["cache_bytes"] < mine[0]["full_bytes"]
  bad = subprocess.run(cmd[:-1] + ["--method_module=no_such_module", f"--out={out}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "--method_module=no_such_module" in bad.stderr


def eval_json(line):
  import json  # pylint: disable=g-import-not-at-top
  return json.loads(line)


def test_register_refuses_what_is_not_a_method():
  import dataclasses  # pylint: disable=g-import-not-at-top
  with pytest.raises(TypeError, match="frozen dataclass"):
    kvlab.methods.register("x_not_frozen")(type("X", (), {"scores": lambda s, c, o: c}))
  with pytest.raises(ValueError, match="already registered"):
    @kvlab.methods.register("snapkv")
    @dataclasses.dataclass(frozen=True)
    class Other(kvlab.methods.Method):  # pylint: disable=unused-variable
      def scores(self, cache, obs=None):
        return cache.positions


def test_readme_python_example_runs_verbatim(default_model):
  """The README's first python block, as written there (extracted, not copied)."""
  del default_model  # loaded once for the session: the example's own load is then warm
  text = open(os.path.join(ROOT, "README.md")).read()
  code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert "4812" in lines[0], proc.stdout  # the answer, from half the cache
  ratio = float(re.search(r"([0-9.]+) of the full cache", proc.stdout).group(1))
  assert 0.4 < ratio < 0.6
