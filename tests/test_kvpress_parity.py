"""kvlab's prefill eviction methods against NVIDIA kvpress 0.5.5 on a tiny random Llama.

The same checkpoint (safetensors in a tmp dir) is loaded by transformers for kvpress and by
``models.load`` for kvlab. One 128-token prompt is prefilled on both sides; kvpress compresses
inside its forward hooks (ratio 0.5: 64 of 128 tokens kept), kvlab prefills with
``method.observe`` and runs ``lib.methods.compress``. We record which token indices kvpress kept
per (layer, kv head) by matching its compressed keys row by row against the keys it was given
(AdaKV only masks: its kept set is the complement of ``masked_key_indices``), and compare them
with ``cache.positions`` of kvlab's valid slots.

Where the two libraries define a method the same way the kept sets must be identical. Where
kvpress departs from METHODS.md (each test's docstring says how), kvlab is asserted against
METHODS.md's formula evaluated on kvpress's own scores or on HF's attention weights, so both
the scoring and the selection are still cross-checked.

Near ties: the two forward passes differ by float32 rounding (~1e-7), so two tokens whose scores
are within that of each other may swap. ``_assert_same_sets`` accepts a swap only when the
reference scores of the swapped tokens are within ``TIE`` (relative) of each other and overlap
stays >= 99 %; with this seed and prompt every comparison is in fact exact (checked with
``TIE = -1``).

CI (``make test``) installs the ``parity`` extra and sets ``KVLAB_REQUIRE_KVPRESS=1``, so there
these tests fail rather than skip when kvpress is missing.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest

if os.environ.get("KVLAB_REQUIRE_KVPRESS"):
  import kvpress  # pylint: disable=g-import-not-at-top
else:
  kvpress = pytest.importorskip("kvpress")
import torch  # pylint: disable=g-import-not-at-top,g-bad-import-order
import transformers  # pylint: disable=g-import-not-at-top,g-bad-import-order

from kvlab import models  # pylint: disable=g-bad-import-order
from kvlab.lib import generate as gen
from kvlab.lib import methods
from kvlab.lib.protocol import reconstruction_scores
from kvlab.lib.reference import load_hf_reference

N = 128  # prompt tokens; even, so kvpress's int(n * (1 - r)) == kvlab's ceil(r * n) at r = .5
KEEP = 64
WINDOW = 16  # SnapKV-family observation window on both sides (kvpress's default is 64)
TIE = 1e-5


@pytest.fixture(scope="module")
def setup(tiny_dir):
  path, _ = tiny_dir("llama")
  ids = np.random.RandomState(7).randint(0, 160, size=N).tolist()
  return {"path": path, "ids": ids, "kvlab": models.load(path, progress=False),
          "hf": load_hf_reference(path)}


# ---- running both sides -------------------------------------------------------------------
def _kvlab(m, ids, method, chunk=32):
  """Prefill in chunks of ``chunk`` with the method's hook, compress; returns kept position
  sets ``[L][K]``, the full cache and the observations."""
  tokens, lengths = gen.pad_batch([ids], chunk)
  cache = m.new_cache(1, tokens.shape[1])
  _, cache, obs = gen.prefill(m.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                              apply_fn=m.apply_fn, chunk_size=chunk, observe=method.observe)
  small = methods.compress(method, cache, obs)
  if small.quant is not None:  # AdaKV / PyramidKV: the paged layout (lib.paged)
    pos, lens = np.asarray(small.quant.dense()[2])[:, 0], np.asarray(small.quant.lengths)[:, 0]
  else:
    pos, lens = np.asarray(small.positions)[:, 0], np.asarray(small.lengths)[:, 0]
  kept = [[set(pos[l, k, :lens[l, k]].tolist()) for k in range(pos.shape[1])]
          for l in range(pos.shape[0])]
  return kept, cache, obs


def _kvpress(hf, ids, press):
  """Runs the prompt through ``hf`` under ``press``; returns per layer the kept index sets
  ``[K]``, the scores kvpress ranked by ``[K, n]`` and the eager attention weights (or None)."""
  scorer = press.press if isinstance(press, kvpress.AdaKVPress) else press
  rec = {"kept": {}, "scores": {}, "attn": {}}
  score_fn, compress_fn = scorer.score, press.compress

  def score(module, *args):
    s = score_fn(module, *args)
    rec["scores"][module.layer_idx] = s[0].detach().clone().numpy()  # AdaKV edits it in place
    return s

  def compress(module, hidden_states, keys, values, attentions, kwargs):
    k_out, v_out = compress_fn(module, hidden_states, keys, values, attentions, kwargs)
    if isinstance(press, kvpress.AdaKVPress):  # masks instead of gathering
      _, heads, seq = module.masked_key_indices
      kept = [set(range(keys.shape[2])) - set(seq[heads == h].tolist())
              for h in range(keys.shape[1])]
    else:  # every kept key equals exactly one input key of its head
      eq = (k_out[0][:, :, None, :] == keys[0][:, None, :, :]).all(-1)  # [K, kept, n]
      assert (eq.sum(-1) == 1).all()
      kept = [set(eq[h].nonzero()[:, 1].tolist()) for h in range(keys.shape[1])]
    rec["kept"][module.layer_idx] = kept
    rec["attn"][module.layer_idx] = None if attentions is None else attentions[0].numpy()
    return k_out, v_out

  scorer.score, press.compress = score, compress
  try:
    with torch.no_grad(), press(hf):
      hf(torch.tensor([ids]), past_key_values=transformers.DynamicCache(), use_cache=True)
  finally:
    del scorer.score, press.compress
  layers = sorted(rec["kept"])
  return ([rec["kept"][l] for l in layers], [rec["scores"].get(l) for l in layers],
          [rec["attn"][l] for l in layers])


def _top(scores, k):
  """Indices of the ``k`` largest scores, as a set."""
  return set(np.argsort(-scores, kind="stable")[:k].tolist())


def _assert_same_sets(ours, theirs, ref_scores=None):
  """``ours[l][k] == theirs[l][k]``; a swapped pair is accepted only as a near tie of
  ``ref_scores[l][k]`` (within ``TIE``, relative above 1) with overall overlap >= 99 %."""
  assert len(ours) == len(theirs) and all(len(o) == len(t) for o, t in zip(ours, theirs))
  total = same = 0
  for l, (ol, tl) in enumerate(zip(ours, theirs)):
    for k, (o, t) in enumerate(zip(ol, tl)):
      assert len(o) == len(t), (l, k, len(o), len(t))
      total += len(o)
      same += len(o & t)
      if o != t:
        assert ref_scores is not None, f"layer {l} head {k}: {sorted(o ^ t)} differ"
        s = np.asarray(ref_scores[l][k], np.float64)
        for i in o - t:
          for j in t - o:
            assert abs(s[i] - s[j]) <= TIE * max(1.0, abs(s[j])), (l, k, i, j, s[i], s[j])
  assert same >= 0.99 * total, (same, total)


def _n_layers_heads(setup):
  c = setup["kvlab"].config
  return c.num_layers, c.num_kv_heads


# ---- methods defined the same way: exact sets ------------------------------------------------
def test_streaming_llm_matches(setup):
  """Same definition: the first 4 tokens (sinks) and the most recent ones up to the budget."""
  ours, _, _ = _kvlab(setup["kvlab"], setup["ids"], methods.StreamingLLM(ratio=0.5, sinks=4))
  theirs, _, _ = _kvpress(setup["hf"], setup["ids"],
                          kvpress.StreamingLLMPress(compression_ratio=0.5, n_sink=4))
  want = set(range(4)) | set(range(N - KEEP + 4, N))
  assert all(s == want for layer in theirs for s in layer)
  _assert_same_sets(ours, theirs)


def test_knorm_matches(setup):
  """Same definition: keep the keys with the smallest L2 norm (post-RoPE keys on both sides)."""
  method = methods.Knorm(ratio=0.5)
  ours, cache, _ = _kvlab(setup["kvlab"], setup["ids"], method)
  theirs, scores, _ = _kvpress(setup["hf"], setup["ids"],
                               kvpress.KnormPress(compression_ratio=0.5))
  np.testing.assert_allclose(np.asarray(method.scores(cache))[:, 0, :, :N], np.stack(scores),
                             rtol=1e-5, atol=1e-6)
  _assert_same_sets(ours, theirs, scores)


def test_snapkv_matches(setup):
  """Same definition once the options agree (window 16, avg pool 5, GQA mean): window queries'
  attention averaged over the window (kvlab sums: the same ranking, scores / W), pooled over
  the pre-window tokens only (the window's own columns are cut before pooling, METHODS.md
  §2.3), mean over each query group; the window is always kept."""
  method = methods.SnapKV(ratio=0.5, window=WINDOW, kernel=5, pooling="avg", gqa="mean")
  ours, cache, obs = _kvlab(setup["kvlab"], setup["ids"], method)
  theirs, scores, _ = _kvpress(setup["hf"], setup["ids"], kvpress.SnapKVPress(
      compression_ratio=0.5, window_size=WINDOW, kernel_size=5))
  got = np.asarray(method.scores(cache, obs))[:, 0, :, :N - WINDOW] / WINDOW
  np.testing.assert_allclose(got, np.stack(scores)[..., :N - WINDOW], rtol=1e-4, atol=1e-7)
  assert all(set(range(N - WINDOW, N)) <= s for layer in ours for s in layer)
  _assert_same_sets(ours, theirs, scores)


def test_expected_attention_matches(setup):
  """Same definition and defaults (kvpress ``ExpectedAttentionPress``): mean and population
  covariance of the pre-RoPE queries after the 4 sinks, RoPE averaged over the next 512
  positions, ``softmax(mu.k/sqrt(d) + k^T Sigma k/(2d))`` over non-sink keys, mean over the
  query group, times ``||v||`` (epsilon 0); sinks always kept."""
  method = methods.ExpectedAttention(ratio=0.5)
  ours, cache, obs = _kvlab(setup["kvlab"], setup["ids"], method)
  theirs, scores, _ = _kvpress(setup["hf"], setup["ids"],
                               kvpress.ExpectedAttentionPress(compression_ratio=0.5))
  got = np.asarray(method.scores(cache, obs))[:, 0, :, :N]
  ref = np.stack(scores)
  np.testing.assert_allclose(got[..., 4:], ref[..., 4:], rtol=1e-4, atol=1e-8)
  assert np.isinf(got[..., :4]).all()
  _assert_same_sets(ours, theirs, scores)


# ---- methods kvpress defines differently: kvlab against METHODS.md -----------------------
def test_pyramidkv_scores_match_budgets_follow_methods_md(setup):
  """Token scores are SnapKV's on both sides and match; the layer budgets differ by design.

  METHODS.md §2.4 (KVCache-Factory): with b = B - w the non-window budget, min = b // beta,
  max = 2b - min (clipped to n - w), integer step (max - min) // (L - 1), budget_l = max - l*step
  + w, and the uniform SnapKV budget when n < 2b. kvpress instead plugs the *total* budget
  n * (1 - r) into the same arithmetic in floats, rounds, and falls back to SnapKV when
  ``not n >= max >= min >= w``. So we assert kvlab's budgets against the METHODS.md formula,
  and that each layer's kept set is the top budget_l of kvpress's own SnapKV scores (which
  also makes the smaller of the two libraries' sets a subset of the larger).
  """
  n_layers, n_heads = _n_layers_heads(setup)
  method = methods.PyramidKV(ratio=0.5, window=WINDOW, kernel=5, beta=20)
  press = kvpress.PyramidKVPress(compression_ratio=0.5, window_size=WINDOW, kernel_size=5,
                                 beta=20)
  ours, _, _ = _kvlab(setup["kvlab"], setup["ids"], method)
  theirs, scores, _ = _kvpress(setup["hf"], setup["ids"], press)

  b = KEEP - WINDOW  # METHODS.md §2.4, in integers
  lo, hi = b // 20, 2 * b - b // 20
  if hi >= N - WINDOW:
    hi, lo = N - WINDOW, 2 * b - (N - WINDOW)
  step = (hi - lo) // (n_layers - 1)
  budgets = [hi - l * step + WINDOW for l in range(n_layers)]
  assert N >= 2 * b and budgets == [110, 64, 18]
  assert [[len(s) for s in layer] for layer in ours] == [[x] * n_heads for x in budgets]

  # kvpress's own budgets (total in the arithmetic, floats): 112, 64, 16 here.
  theirs_budgets = [len(layer[0]) for layer in theirs]
  assert theirs_budgets == [press.get_layer_budget(setup["hf"].model.layers[l].self_attn, N)
                            for l in range(n_layers)] == [112, 64, 16]
  assert theirs_budgets != budgets

  want = [[_top(scores[l][k], budgets[l]) for k in range(n_heads)] for l in range(n_layers)]
  _assert_same_sets(ours, want, scores)
  for l in range(n_layers):
    for k in range(n_heads):
      small, big = sorted((ours[l][k], theirs[l][k]), key=len)
      assert small <= big


def test_tova_matches_except_the_forced_last_token(setup):
  """TOVA's score is the last query's attention averaged over every query head (one set per
  layer) on both sides. kvpress additionally forces the last prompt token in (METHODS.md §2.7:
  "kvpress's port additionally forces the newest token"); the authors' TOVA, and kvlab at
  prefill, rank it like any other. So: kvlab's scores equal HF's mean attention row, kvlab
  keeps the top 64 of it, and the two sets agree whenever the last token makes the top 64
  by itself; otherwise they differ by exactly that token and kvpress's 64th."""
  method = methods.TOVA(ratio=0.5)
  ours, cache, obs = _kvlab(setup["kvlab"], setup["ids"], method)
  theirs, scores, attn = _kvpress(setup["hf"], setup["ids"],
                                  kvpress.TOVAPress(compression_ratio=0.5))
  n_layers, n_heads = _n_layers_heads(setup)
  rows = [a[:, -1, :].mean(0) for a in attn]  # [n] per layer, HF eager attention
  got = np.asarray(method.scores(cache, obs))[:, 0, :, :N]
  np.testing.assert_allclose(got, np.broadcast_to(np.stack(rows)[:, None], got.shape),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.stack(scores)[..., :-1], got[..., :-1], rtol=1e-5, atol=1e-7)
  want = [[_top(rows[l], KEEP)] * n_heads for l in range(n_layers)]
  _assert_same_sets(ours, want, [[r] * n_heads for r in rows])
  for l in range(n_layers):
    assert N - 1 in theirs[l][0]
    if N - 1 in ours[l][0]:
      assert ours[l] == theirs[l]
    else:
      assert len(ours[l][0] - theirs[l][0]) == 1 and theirs[l][0] - ours[l][0] == {N - 1}


def test_h2o_against_observed_attention(setup):
  """kvpress's ``ObservedAttentionPress`` is H2O's prefill score with two differences: it
  divides each key's column sum by the number of queries that can see it (n - j), and keeps no
  recent window. H2O (METHODS.md §2.2, the authors' code) ranks by the raw column sum, and
  kvlab's ``H2O`` forces a recent window (``recent_fraction`` of the budget, 0.5 by default).
  Asserted: kvlab's accumulated column sums equal kvpress's score times (n - j) (i.e. HF's
  eager attention summed over queries, mean over the group); ``H2O(recent_fraction=0)`` keeps
  the top 64 raw sums; default ``H2O`` keeps the last 32 tokens plus the top 32 raw sums of
  the rest; kvpress's own choice differs (the normalisation favours late tokens)."""
  n_layers, n_heads = _n_layers_heads(setup)
  theirs, scores, attn = _kvpress(setup["hf"], setup["ids"],
                                  kvpress.ObservedAttentionPress(compression_ratio=0.5))
  g = attn[0].shape[0] // n_heads
  raw = [a.sum(1).reshape(n_heads, g, N).mean(1) for a in attn]  # [K, n] column sums
  count = np.arange(N, 0, -1)
  np.testing.assert_allclose(np.stack(scores) * count, np.stack(raw), rtol=1e-5, atol=1e-5)

  method = methods.H2O(ratio=0.5, recent_fraction=0.0)
  ours, _, obs = _kvlab(setup["kvlab"], setup["ids"], method)
  np.testing.assert_allclose(np.asarray(obs.sum(0))[:, 0, :, :N], np.stack(raw), rtol=1e-4,
                             atol=1e-5)
  want = [[_top(raw[l][k], KEEP) for k in range(n_heads)] for l in range(n_layers)]
  _assert_same_sets(ours, want, raw)
  assert ours != theirs  # the (n - j) normalisation changes the choice

  recent, _, _ = _kvlab(setup["kvlab"], setup["ids"], methods.H2O(ratio=0.5))
  tail = set(range(N - KEEP // 2, N))
  want = [[tail | _top(raw[l][k][:N - KEEP // 2], KEEP // 2) for k in range(n_heads)]
          for l in range(n_layers)]
  _assert_same_sets(recent, want, raw)


def test_adakv_scores_match_allocation_follows_methods_md(setup):
  """AdaKV over SnapKV scores (window 16, avg pool 5, GQA mean, alpha 0.2 on both sides).

  The per-head scores match: kvlab's ``AdaKV`` takes the window *mean*, which is exactly
  kvpress's SnapKV score. The head budgets differ by design. METHODS.md §2.5 (the authors'
  code): the non-window budget b per head, the layer's top K*b scores are counted per head
  (cnt_h), budget_h = round(cnt_h (1 - alpha) + alpha b), plus the window. kvpress's
  ``AdaKVPress`` instead protects each head's top int(alpha * n_kept) tokens (window included)
  and fills the rest with one layer-wide top-k, so the layer total is exact. Asserted: kvlab's
  budgets equal the METHODS.md formula evaluated on kvpress's scores, each head keeps the
  window plus its top budget_h - w, layer totals agree with kvpress's within rounding (one token
  per head), and every kvpress head keeps at least its safeguard.
  """
  n_layers, n_heads = _n_layers_heads(setup)
  alpha = 0.2
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      setup["path"], dtype=torch.float32, attn_implementation="sdpa").eval()  # AdaKV: no eager
  press = kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=0.5, window_size=WINDOW,
                                                 kernel_size=5), alpha_safeguard=alpha)
  theirs, scores, _ = _kvpress(hf, setup["ids"], press)
  method = methods.AdaKV(ratio=0.5, window=WINDOW, kernel=5, pooling="avg", alpha=alpha)
  ours, cache, obs = _kvlab(setup["kvlab"], setup["ids"], method)

  head_scores = method.head_scores(cache, obs)[0]
  np.testing.assert_allclose(np.asarray(head_scores)[:, 0, :, :N - WINDOW],
                             np.stack(scores)[..., :N - WINDOW], rtol=1e-4, atol=1e-7)

  b = KEEP - WINDOW
  for l in range(n_layers):
    s = np.stack(scores[l])[:, :N - WINDOW]  # [K, n - w]
    cut = np.sort(s.ravel())[::-1][n_heads * b - 1]
    cnt = (s >= cut).sum(-1)
    budgets = [int(np.round(c * (1 - alpha) + alpha * b)) for c in cnt]
    assert [len(x) for x in ours[l]] == [x + WINDOW for x in budgets], (l, cnt)
    want = [_top(s[k], budgets[k]) | set(range(N - WINDOW, N)) for k in range(n_heads)]
    _assert_same_sets([ours[l]], [want], [s])
    assert abs(sum(map(len, ours[l])) - sum(map(len, theirs[l]))) <= n_heads
    assert sum(map(len, theirs[l])) == n_heads * KEEP
    for k in range(n_heads):
      assert _top(scores[l][k], int(KEEP * alpha)) <= theirs[l][k]
      assert set(range(N - WINDOW, N)) <= theirs[l][k]


class _Tokenizer:
  """Stands in for the tokenizer ``KVzipPress`` loads from the checkpoint's name (the tiny
  checkpoint has none): no chat template, each character one id below the vocab."""

  chat_template = None

  def encode(self, text, return_tensors=None, add_special_tokens=False):
    del add_special_tokens
    ids = [ord(c) % 160 for c in text]
    return torch.tensor([ids]) if return_tensors == "pt" else ids


def test_kvzip_scores_match_selection_differs_by_design(setup, monkeypatch):
  """KVzip (kvpress ``KVzipPress``, chunk 2048 > the 128-token context: one repeat, no chat
  template, so no prefix): the same repeat prompt ``"\\n\\nRepeat the previous context
  exactly." + "\\n" + context`` after the context, and each pair's score is the largest
  probability a repeat query gives it, maxed over the query group. With one chunk kvpress's
  normaliser (sinks + chunk + repeat) is the whole cache, as kvlab's, so the scores match.

  The selection differs by design (``lib/methods/kvzip.py``): kvlab keeps the same number of
  pairs in every head (``share=head``); kvpress's ``layerwise=True`` prunes one layer-wide
  bottom-k over all its heads' pairs (the first 4 forced). Asserted: kvpress's kept sets are
  that layer-wide top-k of *kvlab's* scores, and kvlab's are each head's top ``KEEP``.
  """
  monkeypatch.setattr(kvpress.presses.kvzip_press.AutoTokenizer, "from_pretrained",
                      staticmethod(lambda *a, **k: _Tokenizer()))
  hf = setup["hf"]
  press = kvpress.KVzipPress(compression_ratio=0.5, layerwise=True)
  rec = {}
  post = press.compress_post

  def capture(model):
    rec["scores"] = press.score_val[:, 0].clone().numpy()  # [L, K, n] before sinks are forced
    impl = model.config._attn_implementation  # pylint: disable=protected-access
    model.config._attn_implementation = "sdpa"  # pylint: disable=protected-access
    try:
      post(model)  # refuses eager attention; only picks the indices to mask
    finally:
      model.config._attn_implementation = impl  # pylint: disable=protected-access
    rec["masked"] = [l.self_attn.masked_key_indices for l in model.model.layers]
    for l in model.model.layers:
      l.self_attn.masked_key_indices = None

  press.compress_post = capture
  ids = setup["ids"]
  with torch.no_grad(), press(hf):
    hf(torch.tensor([ids]), past_key_values=transformers.DynamicCache(), use_cache=True)

  tok = _Tokenizer()
  prompts = (tok.encode("\n\nRepeat the previous context exactly."),
             tok.encode("\n\nRepeat the part of the previous context exactly, starting with"),
             tok.encode("\n"))
  m = setup["kvlab"]
  method = methods.KVzip(ratio=0.5)
  tokens, lengths = gen.pad_batch([ids], 32)
  cache = m.new_cache(1, tokens.shape[1])
  _, cache, _ = gen.prefill(m.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                            apply_fn=m.apply_fn, chunk_size=32)
  obs = reconstruction_scores(m.params, m.apply_fn, cache, ids, prompts, chunk=2048)
  ours = np.asarray(obs["scores"])[:, 0, :, :N]
  np.testing.assert_allclose(ours, rec["scores"], rtol=1e-4, atol=1e-7)

  n_layers, n_heads = _n_layers_heads(setup)
  forced_ = ours.copy()
  forced_[..., :4] = np.inf
  for l in range(n_layers):
    _, heads, seq = (t.numpy() for t in rec["masked"][l])
    theirs = [set(range(N)) - set(seq[heads == h].tolist()) for h in range(n_heads)]
    flat = _top(forced_[l].ravel(), n_heads * KEEP)
    want = [{i % N for i in flat if i // N == h} for h in range(n_heads)]
    _assert_same_sets([theirs], [want], [forced_[l]])

  small = methods.compress(method, cache, obs)
  pos, lens = np.asarray(small.positions)[:, 0], np.asarray(small.lengths)[:, 0]
  assert (lens == KEEP).all()
  per_head = [[set(range(4)) | {i + 4 for i in _top(ours[l, h, 4:], KEEP - 4)}
               for h in range(n_heads)] for l in range(n_layers)]
  _assert_same_sets([[set(pos[l, h, :KEEP].tolist()) for h in range(n_heads)]
                     for l in range(n_layers)], per_head, forced_)
