"""kvzip_heads: whole heads keep their context by a calibrated table; budgets, layout, errors."""

import json

import numpy as np
import pytest

from kvlab import models
from kvlab.lib.methods.kvzip_heads import table_from_scores
from kvlab.lib import methods
from kvlab.lib.paged import PagedStore
from test_methods import _prefill


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  path, _ = tiny_dir("llama")
  return models.load(path, progress=False, attn_block_size=8)


def _table(tmp_path, scores, **extra):
  p = tmp_path / "heads.json"
  p.write_text(json.dumps({"scores": np.asarray(scores).tolist(), **extra}))
  return str(p)


def test_best_heads_keep_the_context_others_sinks_and_window(tiny, tmp_path):
  c = tiny.config
  ids = np.random.RandomState(3).randint(0, 160, size=48).tolist()
  cache, _ = _prefill(tiny, ids, 8)
  rank = np.random.RandomState(0).permutation(c.num_layers * c.num_kv_heads)
  table = rank.reshape(c.num_layers, c.num_kv_heads).astype(float)  # higher = better
  m = methods.make(f"kvzip_heads:table={_table(tmp_path, table)}:window=4:sinks=2:"
                   "layout=padded", ratio=0.5)
  small = methods.compress(m, cache)
  lens = np.asarray(small.lengths)[:, 0]  # [L, K]
  n_heads = lens.size
  assert lens.sum() == 24 * n_heads  # the uniform budget's total
  order = np.argsort(-table.reshape(-1))
  by_rank = lens.reshape(-1)[order]
  full, base = 48, 6
  spare = (24 - base) * n_heads
  n_full = spare // (full - base)
  assert (by_rank[:n_full] == full).all() and (by_rank[n_full + 1:] == base).all()
  assert by_rank[n_full] == base + spare - n_full * (full - base)  # the boundary head
  for l in range(c.num_layers):
    for k in range(c.num_kv_heads):
      p = set(np.asarray(small.positions)[l, 0, k, :lens[l, k]].tolist())
      want = set(range(2)) | set(range(48 - (lens[l, k] - 2), 48))  # sinks + most recent
      assert p == (set(range(48)) if lens[l, k] == 48 else want), (l, k)
  paged = methods.compress(methods.make(f"kvzip_heads:table={_table(tmp_path, table)}:"
                                        "window=4:sinks=2", ratio=0.5), cache)
  assert isinstance(paged.quant, PagedStore)  # only what each head keeps
  assert paged.nbytes < small.nbytes  # the padded layout stores every head at 48 slots


def test_table_errors(tiny, tmp_path):
  c = tiny.config
  ids = list(range(3, 35))
  cache, _ = _prefill(tiny, ids, 8)
  wrong = _table(tmp_path, np.ones((c.num_layers + 1, c.num_kv_heads)))
  with pytest.raises(ValueError, match="made for another model; make one for this model with "
                     "python -m experiments.calibrate_kvzip_heads"):
    methods.compress(methods.make(f"kvzip_heads:table={wrong}", ratio=0.5), cache)
  with pytest.raises(ValueError, match="no head table at .*missing.json"):
    methods.compress(methods.make(f"kvzip_heads:table={tmp_path}/missing.json", ratio=0.5),
                     cache)
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="is not a head table"):
    methods.compress(methods.make(f"kvzip_heads:table={bad}", ratio=0.5), cache)
  other = _table(tmp_path, np.ones((c.num_layers, c.num_kv_heads)), fingerprint="w1-" + "0" * 20,
                 model="another")
  with pytest.raises(ValueError, match="calibrated on another model \\(another, fingerprint"):
    methods.check_for_model(methods.make(f"kvzip_heads:table={other}", ratio=0.5), c,
                            tiny.params)
  old = _table(tmp_path, np.ones((c.num_layers, c.num_kv_heads)), fingerprint="0" * 16,
               model="another")
  with pytest.raises(ValueError, match="old format"):
    methods.check_for_model(methods.make(f"kvzip_heads:table={old}", ratio=0.5), c,
                            tiny.params)
  with pytest.raises(ValueError, match="sinks and window are slot counts"):
    methods.make("kvzip_heads:window=-1", ratio=0.5)


def test_head_table_is_the_max_past_the_skipped_slots():
  s = np.zeros((2, 1, 3, 10), np.float32)
  s[..., 0] = 9.0  # a sink: left out
  s[1, 0, 2, 5] = 0.7
  s[0, 0, 1, 8] = 0.4
  s[0, 0, 1, 9] = 5.0  # past the context's length: left out
  t = table_from_scores(s, 9, 1)
  assert t.shape == (2, 3) and t[1, 2] == np.float32(0.7) and t[0, 1] == np.float32(0.4)
  assert t[0, 0] == 0.0
  with pytest.raises(ValueError, match="nothing to score"):
    table_from_scores(s, 4, 4)


def test_compressing_while_prefilling_keeps_the_same_slots(tiny, tmp_path):
  """The budgets depend on the lengths and the table only, and the slots on positions, so the
  chunk-by-chunk selection (``lib.online``) keeps exactly what compressing after prefill
  keeps, in every layer, row and head."""
  from test_online import _offline, _online  # pylint: disable=g-import-not-at-top
  c = tiny.config
  table = np.arange(c.num_layers * c.num_kv_heads)[::-1].reshape(c.num_layers, c.num_kv_heads)
  m = methods.make(f"kvzip_heads:table={_table(tmp_path, table)}:window=4:layout=padded",
                   ratio=0.25)
  rng = np.random.RandomState(5)
  prompts = [rng.randint(0, 160, size=n).tolist() for n in (61, 37)]
  _, online, kept = _online(tiny, prompts, m, 8)
  _, offline, _ = _offline(tiny, prompts, m, 8)
  np.testing.assert_array_equal(np.asarray(online.lengths), kept)
  np.testing.assert_array_equal(np.asarray(offline.lengths), kept)
  assert len(np.unique(kept[:, 0])) > 1  # ragged: whole heads vs sinks + window
  for l, b, k in np.ndindex(*kept.shape):
    n = kept[l, b, k]
    np.testing.assert_array_equal(np.sort(np.asarray(online.positions)[l, b, k, :n]),
                                  np.sort(np.asarray(offline.positions)[l, b, k, :n]))
