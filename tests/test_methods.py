"""Method interface: budgets, selection with real byte savings, and each scorer's formula."""

import jax.numpy as jnp
import numpy as np
import pytest

from kvlab import models
from kvlab.lib import generate as gen
from kvlab.lib import methods
from kvlab.lib.cache import KVCache
from kvlab.lib.protocol import compress_then_ask


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  path, _ = tiny_dir("llama")
  return models.load(path, progress=False, attn_block_size=8)


def _prefill(m, ids, chunk, observe=None, batch_ids=None):
  prompts = batch_ids or [ids]
  tokens, lengths = gen.pad_batch(prompts, chunk)
  cache = m.new_cache(len(prompts), tokens.shape[1])
  _, cache, obs = gen.prefill(m.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                              apply_fn=m.apply_fn, chunk_size=chunk, observe=observe)
  return cache, obs


@pytest.mark.parametrize("kw,msg", [
    (dict(ratio=0.0), "ratio .* must be in \\(0, 1\\]"),
    (dict(ratio=1.5), "ratio .* must be in \\(0, 1\\]"),
    (dict(), "exactly one of ratio"),
    (dict(ratio=0.5, budget=3), "exactly one of ratio"),
    (dict(budget=0), "budget must be >= 1"),
])
def test_bad_budgets(kw, msg):
  with pytest.raises(ValueError, match=msg):
    methods.SnapKV(**kw)


def test_budget_larger_than_prompt_and_unknown_names(tiny):
  cache, obs = _prefill(tiny, list(range(3, 23)), 8, methods.Knorm(budget=5).observe)
  with pytest.raises(ValueError, match="budget 50 is larger than the prompt \\(20 tokens\\)"):
    methods.compress(methods.Knorm(budget=50), cache, obs)
  with pytest.raises(ValueError, match="unknown method 'h2x'; known: .*snapkv"):
    methods.make("h2x", ratio=0.5)
  with pytest.raises(ValueError, match="does not take \\['bits'\\]"):
    methods.make("snapkv", ratio=0.5, bits=2)


def test_select_keeps_budget_in_position_order_and_saves_bytes():
  rng = np.random.RandomState(0)
  l, b, k, s, h = 2, 2, 3, 16, 4
  cache = KVCache.init(num_layers=l, batch=b, kv_heads=k, capacity=s, head_dim=h)
  kv = jnp.asarray(rng.randn(l, b, k, s, h).astype(np.float32))
  cache = cache.append(kv, kv * 2, jnp.asarray([16, 11]))
  scores = jnp.asarray(rng.randn(l, b, k, s).astype(np.float32))
  kept = jnp.asarray(np.array([[[5, 5, 5], [4, 4, 4]]] * l, np.int32))
  small = methods.select(cache, scores, kept, capacity=8)
  assert small.capacity == 8 and small.nbytes < cache.nbytes
  for li in range(l):
    for bi, n in ((0, 16), (1, 11)):
      for ki in range(k):
        want = np.sort(np.argsort(-np.asarray(scores[li, bi, ki, :n]))[: int(kept[li, bi, ki])])
        got_pos = np.asarray(small.positions[li, bi, ki, : int(kept[li, bi, ki])])
        np.testing.assert_array_equal(got_pos, want)
        np.testing.assert_array_equal(small.keys[li, bi, ki, : len(want)], kv[li, bi, ki, want])
        np.testing.assert_array_equal(small.values[li, bi, ki, : len(want)],
                                      2 * kv[li, bi, ki, want])
        assert (np.asarray(small.positions[li, bi, ki, len(want):]) == -1).all()


def test_streaming_llm_keeps_sinks_and_recent(tiny):
  cache, _ = _prefill(tiny, list(range(3, 43)), 8)  # 40 tokens
  small = methods.compress(methods.StreamingLLM(budget=12, sinks=4), cache)
  pos = np.asarray(small.positions[..., :12])
  np.testing.assert_array_equal(pos, np.broadcast_to(
      np.r_[0:4, 32:40], pos.shape))
  assert (np.asarray(small.lengths) == 12).all()


def test_knorm_keeps_smallest_key_norms(tiny):
  cache, _ = _prefill(tiny, list(range(3, 43)), 8)
  small = methods.compress(methods.Knorm(ratio=0.25), cache)
  norms = np.linalg.norm(np.asarray(cache.keys[..., :40, :]), axis=-1)
  want = np.sort(np.argsort(norms, axis=-1)[..., :10], axis=-1)
  np.testing.assert_array_equal(np.asarray(small.positions[..., :10]), want)


def _all_queries(layer, x, cache):
  return x.q


def _snapkv_reference(m, ids, window, kernel):
  """SnapKV straight from METHODS.md §2.3 in numpy, from all prompt queries."""
  cache, q_all = _prefill(m, ids, 64, _all_queries)
  n = len(ids)
  c = m.config
  q = np.asarray(q_all)[0][:, 0, :n]  # [L, n, N, H]
  keys = np.asarray(cache.keys)[:, 0, :, :n]  # [L, K, n, H]
  g = c.num_heads // c.num_kv_heads
  out = []
  for layer in range(c.num_layers):
    qw = q[layer, n - window:].reshape(window, c.num_kv_heads, g, -1)  # [W, K, G, H]
    logits = np.einsum("wkgh,ksh->kgws", qw, keys[layer]) / np.sqrt(c.head_dim)
    causal = np.arange(n)[None, :] <= (n - window + np.arange(window))[:, None]
    logits = np.where(causal, logits, -np.inf)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    vote = a.sum(2).mean(1)  # [K, n]: sum over window, mean over the group
    vote[:, n - window:] = 0.0  # only A[..., :n-w] is pooled (zero padding at the window edge)
    padded = np.pad(vote, ((0, 0), (kernel // 2, kernel // 2)))
    pooled = np.stack([padded[:, i:i + kernel].sum(-1) / kernel for i in range(n)], -1)
    pooled[:, n - window:] = 2.0 ** 23 + np.arange(n - window, n)  # forced, recent first
    out.append(pooled)
  return np.stack(out)  # [L, K, n]


def test_snapkv_matches_formula_and_is_chunking_invariant(tiny):
  ids = np.random.RandomState(5).randint(0, 160, size=37).tolist()
  ref = _snapkv_reference(tiny, ids, window=6, kernel=5)
  method = methods.SnapKV(budget=15, window=6, kernel=5)
  want = np.sort(np.argsort(-ref, axis=-1, kind="stable")[..., :15], axis=-1)
  for chunk in (8, 64):  # window straddles chunks at 8
    cache, obs = _prefill(tiny, ids, chunk, method.observe)
    np.testing.assert_allclose(np.asarray(method.scores(cache, obs))[:, 0, :, :37], ref,
                               rtol=1e-5, atol=1e-7)
    small = methods.compress(method, cache, obs)
    np.testing.assert_array_equal(np.asarray(small.positions[:, 0, :, :15]), want)


def test_tova_keeps_one_token_set_per_layer(tiny):
  ids = np.random.RandomState(6).randint(0, 160, size=30).tolist()
  method = methods.TOVA(ratio=0.3)
  cache, obs = _prefill(tiny, ids, 8, method.observe)
  small = methods.compress(method, cache, obs)
  pos = np.asarray(small.positions[:, 0, :, :9])
  assert (pos == pos[:, :1]).all()  # same tokens in every kv head of a layer
  assert (pos[..., -1] == 29).all()  # the last token attends to itself most in practice


def test_compose_applies_in_order(tiny):
  ids = list(range(3, 43))
  comp = methods.make("snapkv:ratio=0.5+knorm", ratio=0.5)
  assert isinstance(comp, methods.Compose)
  cache, obs = _prefill(tiny, ids, 8, comp.observe)
  small = methods.compress(comp, cache, obs, extra=4)
  assert (np.asarray(small.lengths) == 10).all()  # ceil(.5 * ceil(.5 * 40))
  assert small.capacity == 16  # 10 kept + 4 extra, rounded to 8


def test_batched_rows_compress_by_their_own_length(tiny):
  rng = np.random.RandomState(7)
  prompts = [rng.randint(0, 160, size=n).tolist() for n in (40, 13)]
  method = methods.SnapKV(ratio=0.5, window=4)
  cache, obs = _prefill(tiny, None, 8, method.observe, batch_ids=prompts)
  small = methods.compress(method, cache, obs)
  np.testing.assert_array_equal(np.asarray(small.lengths[:, 0]), 20)
  np.testing.assert_array_equal(np.asarray(small.lengths[:, 1]), 7)
  for (row, p) in enumerate(prompts):
    one, o1 = _prefill(tiny, p, 8, method.observe)
    alone = methods.compress(method, one, o1)
    k = int(alone.lengths[0, 0, 0])
    np.testing.assert_array_equal(np.asarray(small.positions[:, row, :, :k]),
                                  np.asarray(alone.positions[:, 0, :, :k]))


@pytest.mark.parametrize("spec", ["snapkv", "streaming_llm", "knorm", "tova"])
def test_keeping_everything_reproduces_the_full_cache_answer(tiny, spec):
  rng = np.random.RandomState(8)
  ctx = [rng.randint(0, 160, size=n).tolist() for n in (29, 17)]
  qs = [rng.randint(0, 160, size=n).tolist() for n in (5, 9)]
  c = tiny.config
  kw = dict(num_layers=c.num_layers, kv_heads=c.num_kv_heads, head_dim=c.head_dim,
            max_new_tokens=6, chunk_size=8, block=8)
  full = compress_then_ask(tiny.params, tiny.apply_fn, ctx, qs, **kw)
  same = compress_then_ask(tiny.params, tiny.apply_fn, ctx, qs,
                           method=methods.make(spec, ratio=1.0), **kw)
  half = compress_then_ask(tiny.params, tiny.apply_fn, ctx, qs,
                           method=methods.make(spec, ratio=0.5), **kw)
  assert same["tokens"] == full["tokens"]
  assert half["cache_bytes"] < 0.75 * full["cache_bytes"]
