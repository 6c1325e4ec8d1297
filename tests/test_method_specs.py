"""Method specs and options are checked when they are parsed (``methods.make``), before any model
loads; compositions say what they keep; short prompts and oversized caches are never silent
(issue 32)."""

import re
import warnings

import numpy as np
import pytest

from kvlab.lib import methods
from kvlab.lib.methods import MethodWarning
from test_methods_budgets import _prefill, tiny  # pylint: disable=unused-import




@pytest.mark.parametrize("spec", ["snapkv+", "+snapkv", "snapkv++kivi", "snapkv+ +kivi"])
def test_empty_member_is_refused(spec):
  """``snapkv+`` used to run snapkv under another leaderboard label."""
  with pytest.raises(ValueError, match="has an empty member .* e.g. snapkv\\+kivi"):
    methods.make(spec, ratio=0.5)


def test_two_evictors_at_the_shared_ratio_are_refused_and_kept_fraction_says_what_is_kept():
  """``kvzip+snapkv`` at 0.5 kept 0.25 of the prompt under the label 0.5: refused at make time
  naming the fraction and the fix; a member's own ratio replaces the shared one for that member
  (the fraction it keeps of what it receives), and ``kept_fraction`` states the product."""
  with pytest.raises(ValueError, match=r"kvzip\+snapkv at ratio 0\.5: 2 members evict tokens "
                     r"\(kvzip, snapkv\) .* 0\.5 x 0\.5 = 0\.25 of the prompt under the label "
                     r"0\.5: give all but one of them its own ratio .* e\.g\. "
                     r"kvzip:ratio=0\.71\+snapkv "):
    methods.make("kvzip+snapkv", ratio=0.5)
  with pytest.raises(ValueError, match=r"0\.5 x 0\.5 x 0\.5 = 0\.125 .* e\.g\. "
                     r"knorm:ratio=0\.71\+snapkv:window=8:ratio=0\.71\+tova\+kivi "):
    methods.make("knorm+snapkv:window=8+tova+kivi", ratio=0.5)
  own = methods.make("kvzip:ratio=0.7+snapkv", ratio=0.5)
  assert own.methods[0].ratio == 0.7 and own.methods[1].ratio == 0.5
  assert methods.kept_fraction(own) == pytest.approx(0.35)
  assert methods.kept_fraction(methods.make("snapkv+knorm", ratio=1.0)) == 1.0  # keeps all
  assert methods.kept_fraction(methods.make("snapkv+kivi", ratio=0.5)) == 0.5  # kivi keeps all
  assert methods.kept_fraction(methods.make("matryoshka", ratio=1.0)) == 1.0
  assert methods.kept_fraction(methods.make("snapkv", budget=64)) is None  # depends on length


@pytest.mark.parametrize("spec,msg", [
    ("snapkv:window=abc", "snapkv: option window=abc must be a whole number: e.g. "
                          "--method=snapkv:window=32"),
    ("snapkv:window=1.5", "snapkv: option window=1.5 must be a whole number"),
    ("expected_attention:use_covariance=yes", "option use_covariance=yes must be true or "
                                              "false: e.g. .*use_covariance=true"),
    ("keyformer:tau=fast", "keyformer: option tau=fast must be a number: e.g. "
                           "--method=keyformer:tau=1.0"),
    ("snapkv+kivi:group=16.0", "kivi: option group=16.0 must be a whole number"),
    ("snapkv+think:window=2.5", "think: option window=2.5 must be a whole number"),
])
def test_option_values_are_typed_by_the_field(spec, msg):
  """``window=abc`` used to reach the model (a TypeError inside compress)."""
  with pytest.raises(ValueError, match=msg):
    methods.make(spec, ratio=0.5)


def test_option_values_get_the_field_types():
  m = methods.make("snapkv:window=8:pooling=max:kernel=4", ratio=0.5)
  assert (m.window, m.kernel, m.pooling) == (8, 4, "max") and isinstance(m.window, int)
  e = methods.make("expected_attention:use_vnorm=false:future=64", ratio=0.5)
  assert e.use_vnorm is False and e.future == 64
  r = methods.make("matryoshka:rank=32", ratio=1.0)
  assert r.rank == 32.0 and isinstance(r.rank, float)
  with pytest.raises(ValueError, match="whole number"):  # Python callers are checked too
    methods.SnapKV(ratio=0.5, window=4.0)


@pytest.mark.parametrize("spec,msg", [
    # eviction: SnapKV's fields (window=-3 failed after 55 s in top_k, window=0 on a
    # zero-size array, an even kernel on a shape mismatch, an unknown pooling ran max)
    ("snapkv:window=-3", r"snapkv: window \(observation queries\) must be >= 1, got -3: e\.g\. "
                         r"--method=snapkv:window=32"),
    ("snapkv:window=0", r"snapkv: window .* must be >= 1, got 0"),
    ("snapkv:kernel=4", r"kernel must be odd with pooling=avg .* got 4: e\.g\. "
                        r"--method=snapkv:kernel=5"),
    ("snapkv:pooling=mean", r"pooling .* must be one of avg, max, got 'mean'"),
    ("streaming_llm:sinks=-1", r"streaming_llm: sinks .* must be >= 0, got -1"),
    # accumulated attention
    ("h2o:recent_fraction=1.5", r"h2o: recent_fraction is .* in \[0, 1\], got 1\.5"),
    ("keyformer:tau=0", r"keyformer: tau .* must be > 0, got 0\.0"),
    # budget allocators, expected attention, context reconstruction
    ("pyramidkv:beta=0", r"pyramidkv: beta .* must be >= 1, got 0"),
    ("adakv:window=0", r"adakv: window .* must be >= 1, got 0"),
    ("expected_attention:future=0", r"expected_attention: future .* must be >= 1, got 0"),
    ("kvzip:sinks=-1", r"kvzip: sinks .* must be >= 0, got -1"),
    # low rank: a fractional rank above 1 was truncated silently
    ("snapkv+xkv:rank_k=1.5", r"xkv: ranks must be positive .* got rank_k=1\.5"),
    ("snapkv+matryoshka:rank=2.5", r"matryoshka: rank must be .* got 2\.5"),
])
def test_option_ranges_are_checked_by_make(spec, msg):
  with pytest.raises(ValueError, match=msg):
    methods.make(spec, ratio=0.5)


def test_window_not_smaller_than_the_budget_warns_and_still_votes(tiny):
  """A prompt shorter than SnapKV's window (20 tokens, window 32, ratio 0.5: budget 10) kept
  only its newest tokens, evicting the first ones (the attention sinks; SmolLM2 then answered
  nothing): it now runs with a window of half the budget, as if given that window, and warns."""
  ids = np.random.RandomState(3).randint(0, 160, size=20).tolist()
  method = methods.SnapKV(ratio=0.5)
  cache, obs = _prefill(tiny, ids, 8, method.observe)
  with pytest.warns(MethodWarning, match=r"snapkv: the observation window \(32 tokens\) is not "
                    r"smaller than the budget \(10 of a 20-token prompt\).*window of 5, as "
                    r"--method=snapkv:window=5 would"):
    small = methods.compress(method, cache, obs)
  pos = np.asarray(small.positions)[:, 0, :, :10]
  assert (pos < 10).any()  # not only the newest ten
  assert (np.sort(pos, -1)[..., -5:] == np.arange(15, 20)).all()  # the (smaller) window kept
  explicit = methods.SnapKV(ratio=0.5, window=5)
  cache, obs = _prefill(tiny, ids, 8, method.observe)
  with warnings.catch_warnings():
    warnings.simplefilter("error", MethodWarning)
    same = methods.compress(explicit, cache, obs)
  np.testing.assert_array_equal(np.asarray(same.positions)[:, 0, :, :10], pos)
  cache, obs = _prefill(tiny, ids, 8, method.observe)
  with pytest.warns(MethodWarning, match="pyramidkv: the observation window"):
    methods.compress(methods.PyramidKV(ratio=0.5), cache, obs)


@pytest.mark.slow
def test_snapkv_answers_a_prompt_shorter_than_its_window(default_model):
  """The issue's probe: ``generate --method=snapkv --ratio=0.9`` on a 36-token prompt."""
  from kvlab.lib.protocol import ask, compress_for, prefill_context  # pylint: disable=g-import-not-at-top
  m = default_model
  ids = m.tokenizer.encode_chat("What is the capital city?")
  assert len(ids) == 36
  c = m.config
  method = methods.make("snapkv", ratio=0.9)
  cache, obs, _ = prefill_context(m.params, m.apply_fn, [ids[:-1]], num_layers=c.num_layers,
                                  kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=m.dtype,
                                  observe=method.observe)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    small, _, _ = compress_for(method, cache, obs, 8 + 16)
  answers, _ = ask(m.params, m.apply_fn, small, [ids[-1:]], max_new_tokens=16,
                   stop_tokens=m.stop_tokens)
  assert m.tokenizer.decode(answers[0]).strip()  # was "": the model stopped at once
  assert any("budget (32 of a 35-token prompt)" in str(w.message) for w in caught)


def test_runner_rows_flag_a_cache_larger_than_the_full_one(tiny):
  """MiniCache keeping every original (``retain=1``) stores more than the full cache: the row
  says so (``larger_than_full``, ``warning``) and a MethodWarning is printed; every row
  records ``kept_fraction``."""
  from kvlab.lib.eval.runner import run_perplexity  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(5)
  prefix, cont = rng.randint(0, 160, size=40).tolist(), rng.randint(0, 160, size=8).tolist()
  specs = [("minicache:start=0:retain=1", 1.0), ("snapkv:window=4", 0.5)]
  cells = [(s, r, methods.make(s, ratio=r)) for s, r in specs]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    full, mini, snap = run_perplexity(tiny, prefix, cont, cells, chunk_size=8)
  assert mini["cache_bytes"] > mini["full_bytes"]
  assert mini["larger_than_full"] is True
  assert re.match(r"minicache:start=0:retain=1: the compressed cache \(.* MB\) is larger than "
                  r"the full cache \(.* MB\) on a 40-token prompt", mini["warning"])
  assert snap["larger_than_full"] is False and snap["warning"] is None
  assert full["larger_than_full"] is False
  assert (full["kept_fraction"], mini["kept_fraction"], snap["kept_fraction"]) == (1.0, 1.0, 0.5)
  printed = [str(w.message) for w in caught if issubclass(w.category, MethodWarning)]
  assert printed == [mini["warning"]]
