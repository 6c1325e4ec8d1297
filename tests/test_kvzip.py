"""KVzip: reconstruction scores against numpy, budgets, the runner, and its errors."""

import jax
import numpy as np
import pytest

from kvlab import models
from kvlab.models import decoder as model_decoder
from kvlab.lib import methods
from kvlab.lib.methods.kvzip import reconstructor
from kvlab.lib.protocol import reconstruction_scores
from test_methods import _all_queries, _prefill

PROMPTS = ([101, 102], [103, 104, 105], [106])  # (first, later, suffix) token ids


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  path, _ = tiny_dir("llama")
  return models.load(path, progress=False, attn_block_size=8)


def _repeat_reference(m, ctx, run):
  """``[L, K, n]``: numpy max over ``run``'s queries and each query group of the softmax over
  every earlier key, when ``run`` follows ``ctx`` in one sequence."""
  seq = list(ctx) + list(run)
  cache, q_all = _prefill(m, seq, 64, _all_queries)
  c, n, t = m.config, len(ctx), len(seq)
  g = c.num_heads // c.num_kv_heads
  q = np.asarray(q_all)[0][:, 0, n:t].astype(np.float64)  # [L, R, N, H]
  keys = np.asarray(cache.keys)[:, 0, :, :t].astype(np.float64)  # [L, K, t, H]
  q = q.reshape(q.shape[0], q.shape[1], c.num_kv_heads, g, -1)
  z = np.einsum("lrkgh,lksh->lkgrs", q, keys) / np.sqrt(c.head_dim)
  causal = np.arange(t)[None, :] <= (n + np.arange(len(run)))[:, None]  # [R, t]
  z = np.where(causal, z, -np.inf)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return p.max(axis=(2, 3))[..., :n]


@pytest.mark.parametrize("chunk,prefix,kept", [(64, 0, True), (9, 0, True), (9, 3, True),
                                               (9, 3, False)])
def test_scores_are_the_max_attention_of_each_repeat(tiny, chunk, prefix, kept, monkeypatch):
  """One repeat (chunk >= content) or several (each on its own copy of the cache, the later
  ones led by the previous chunk's last 8 tokens): each slot's score is the largest
  probability any repeat query gives it, as numpy computes it from one forward sequence.
  ``kept``: from the attention's kept probabilities; else the hook's own pass."""
  if not kept:
    monkeypatch.setattr(model_decoder, "PROBS_MAX_BYTES", 0)
    jax.clear_caches()  # the limit is read when the prefill is traced
  ctx = np.random.RandomState(3).randint(0, 100, size=25).tolist()
  cache, _ = _prefill(tiny, ctx, 8)
  out = reconstruction_scores(tiny.params, tiny.apply_fn, cache, ctx, PROMPTS, chunk=chunk,
                              prefix=prefix, chunk_size=8, block=8)
  content = ctx[prefix:]
  pieces = [content[a:a + chunk] for a in range(0, len(content), chunk)]
  ref = None
  for i, piece in enumerate(pieces):
    lead = PROMPTS[0] if i == 0 else PROMPTS[1] + pieces[i - 1][-8:]
    r = _repeat_reference(tiny, ctx, lead + PROMPTS[2] + piece)
    ref = r if ref is None else np.maximum(ref, r)
  got = np.asarray(out["scores"])[:, 0, :, :len(ctx)]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
  assert int(out["prefix"][0]) == prefix
  assert int(np.asarray(cache.lengths).max()) == len(ctx)  # the cache itself is untouched


def test_kvzip_keeps_prefix_and_top_scores(tiny):
  ctx = np.random.RandomState(4).randint(0, 100, size=30).tolist()
  cache, _ = _prefill(tiny, ctx, 8)
  obs = reconstruction_scores(tiny.params, tiny.apply_fn, cache, ctx, PROMPTS, chunk=16,
                              prefix=6, chunk_size=8, block=8)
  s = np.asarray(obs["scores"])[:, 0, :, :30]
  per_head = methods.compress(methods.make("kvzip", ratio=0.5), cache, obs)
  pos = np.asarray(per_head.positions)[:, 0, :, :15]
  for layer in range(s.shape[0]):
    for k in range(s.shape[1]):
      top = set(np.argsort(-s[layer, k, 6:])[:9] + 6)  # 15 kept - 6 forced
      assert set(pos[layer, k]) == set(range(6)) | top, (layer, k)
  layer = methods.compress(methods.make("kvzip:share=layer", ratio=0.5), cache, obs)
  lp = np.asarray(layer.positions)[:, 0, :, :15]
  assert (lp == lp[:, :1]).all() and (lp[:, :, :6] == np.arange(6)).all()
  for li in range(s.shape[0]):
    assert set(lp[li, 0, 6:]) == set(np.argsort(-s[li, :, 6:].mean(0))[:9] + 6)
  ada = methods.compress(methods.make("adakv:scorer=kvzip:layout=padded", ratio=0.5), cache,
                         obs)
  lens = np.asarray(ada.lengths)[:, 0]  # [L, K]: per-head budgets from the repeat scores
  np.testing.assert_allclose(lens.sum(-1), 15 * lens.shape[1], atol=lens.shape[1])
  for li in range(s.shape[0]):
    for k in range(s.shape[1]):
      p = set(np.asarray(ada.positions)[li, 0, k, :lens[li, k]].tolist())
      assert p == set(range(6)) | set(np.argsort(-s[li, k, 6:])[:lens[li, k] - 6] + 6)


def test_options_and_errors(tiny):
  assert reconstructor(methods.make("kvzip+kivi", ratio=0.5)).chunk == 2048
  assert reconstructor(methods.make("adakv:scorer=kvzip", ratio=0.5)) is not None
  assert reconstructor(methods.make("snapkv", ratio=0.5)) is None
  with pytest.raises(ValueError, match="chunk .* must be >= 1"):
    methods.make("kvzip:chunk=0", ratio=0.5)
  with pytest.raises(ValueError, match="share must be one of head, layer"):
    methods.make("kvzip:share=model", ratio=0.5)
  with pytest.raises(ValueError, match="must come first, e.g. kvzip\\+snapkv"):
    methods.make("snapkv+kvzip", ratio=0.5)
  ctx = list(range(3, 28))
  cache, _ = _prefill(tiny, ctx, 8)
  with pytest.raises(ValueError, match="passes the model's limit of 40 positions: lower the "
                     "chunk \\(--method=kvzip:chunk=7\\)"):
    reconstruction_scores(tiny.params, tiny.apply_fn, cache, ctx, PROMPTS, chunk=20,
                          max_context=40, chunk_size=8, block=8)
  with pytest.raises(ValueError, match="the context has 24"):
    reconstruction_scores(tiny.params, tiny.apply_fn, cache, ctx[:-1], PROMPTS, chunk=20,
                          chunk_size=8, block=8)
  two, _ = _prefill(tiny, None, 8, batch_ids=[ctx, ctx])
  with pytest.raises(ValueError, match="one context at a time"):
    reconstruction_scores(tiny.params, tiny.apply_fn, two, ctx, PROMPTS, chunk=20,
                          chunk_size=8, block=8)
  from kvlab.lib.online import split_online  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="cannot compress while prefilling"):
    split_online(methods.make("kvzip", ratio=0.5))
