"""H2O/Keyformer accumulated attention, PyramidKV layer budgets, AdaKV head budgets."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab import models
from kvlab.lib import generate as gen
from kvlab.lib import methods
from kvlab.lib.protocol import reconstruction_scores
from test_methods import _all_queries


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  path, _ = tiny_dir("llama")
  return models.load(path, progress=False, attn_block_size=8)


def _prefill(m, ids, chunk, observe=None):
  tokens, lengths = gen.pad_batch([ids], chunk)
  cache = m.new_cache(1, tokens.shape[1])
  _, cache, obs = gen.prefill(m.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                              apply_fn=m.apply_fn, chunk_size=chunk, observe=observe)
  return cache, obs


def test_h2o_column_sums_equal_full_attention(tiny):
  ids = np.random.RandomState(9).randint(0, 160, size=27).tolist()
  c = tiny.config
  cache, q_all = _prefill(tiny, ids, 64, _all_queries)
  n = len(ids)
  q = np.asarray(q_all)[0][:, 0, :n]  # [L, n, N, H]
  keys = np.asarray(cache.keys)[:, 0, :, :n]
  g = c.num_heads // c.num_kv_heads
  want = []
  for layer in range(c.num_layers):
    qq = q[layer].reshape(n, c.num_kv_heads, g, -1)
    lg = np.einsum("nkgh,ksh->kgns", qq, keys[layer]) / np.sqrt(c.head_dim)
    lg = np.where(np.tril(np.ones((n, n), bool)), lg, -np.inf)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want.append(p.sum(2).mean(1))  # [K, n]
  want = np.stack(want)
  method = methods.H2O(ratio=0.5)
  cache8, obs = _prefill(tiny, ids, 8, method.observe)  # 4 chunks
  got = np.asarray(obs.sum(0))[:, 0, :, :n]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  small = methods.compress(method, cache8, obs)
  kept = np.asarray(small.positions[:, 0, :, :14])
  recent = set(range(n - 7, n))  # ceil(0.5 * 27) = 14 kept, half of them recent
  assert all(recent <= set(kept[l, k]) for l in range(c.num_layers)
             for k in range(c.num_kv_heads))
  heavy = np.argsort(-want[..., : n - 7], axis=-1)[..., :7]
  np.testing.assert_array_equal(np.sort(kept[..., :7], -1), np.sort(heavy, -1))


def test_keyformer_is_seeded_and_keeps_recent(tiny):
  ids = np.random.RandomState(10).randint(0, 160, size=40).tolist()
  runs = {}
  for seed in (0, 0, 1):
    m = methods.Keyformer(ratio=0.5, seed=seed)
    cache, obs = _prefill(tiny, ids, 8, m.observe)
    runs.setdefault(seed, []).append(np.asarray(methods.compress(m, cache, obs).positions))
  np.testing.assert_array_equal(runs[0][0], runs[0][1])
  assert (runs[0][0] != runs[1][0]).any()
  assert (runs[0][0][..., 14:20] == np.arange(34, 40)).all()  # ceil(.3 * 20) = 6 recent


def test_pyramidkv_layer_budgets(tiny):
  m = methods.PyramidKV(ratio=0.25, window=4, beta=20)
  lengths = np.full((6, 1, 2), 400)
  kept = m.kept(lengths)[:, 0, 0]
  assert (np.diff(kept) < 0).all()  # lower layers keep more
  assert abs(kept.mean() - 100) <= 2  # the mean budget is SnapKV's
  # Short prompts (n < 2 * non-window budget) fall back to the uniform budget.
  assert (methods.PyramidKV(ratio=0.75, window=4).kept(lengths) == 300).all()


def test_adakv_budgets_move_between_heads(tiny):
  ids = np.random.RandomState(11).randint(0, 160, size=48).tolist()
  m = methods.AdaKV(ratio=0.25, window=4, layout="padded")  # test_paged.py: the paged layout
  cache, obs = _prefill(tiny, ids, 8, m.observe)
  small = methods.compress(m, cache, obs)
  lens = np.asarray(small.lengths)[:, 0]  # [L, K]
  uniform = 12
  np.testing.assert_allclose(lens.sum(-1), uniform * lens.shape[1], atol=lens.shape[1])
  assert (lens >= 4 + np.floor(0.2 * (uniform - 4))).all()  # window + safeguard floor
  assert small.capacity == gen.round_up(int(lens.max()), 8)
  for l in range(lens.shape[0]):
    for k in range(lens.shape[1]):
      p = np.asarray(small.positions[l, 0, k])
      assert (p[: lens[l, k]] >= 0).all() and (p[lens[l, k]:] == -1).all()
      assert set(range(44, 48)) <= set(p[: lens[l, k]].tolist())


@pytest.mark.parametrize("scorer", methods.budgets.ADAKV_SCORERS)
def test_adakv_takes_budgets_from_any_scorer(tiny, scorer):
  """``adakv:scorer=X``: the layer's budget is shared between heads by X's per-head scores
  (METHODS.md §2.5's formula, evaluated here in numpy), and what X forces in stays."""
  ids = np.random.RandomState(13).randint(0, 160, size=160).tolist()  # SnapKV's window: 32
  m = methods.make(f"adakv:scorer={scorer}:layout=padded", ratio=0.25)
  assert m.scorer == scorer
  cache, obs = _prefill(tiny, ids, 8, m.observe)
  if scorer == "kvzip":  # its observations are the model's repeat passes, not a prefill hook
    obs = reconstruction_scores(tiny.params, tiny.apply_fn, cache, ids, ([5], [6], [7]),
                                chunk=64, prefix=2, chunk_size=8, block=8)
  free, forced, scores = (np.asarray(x)[:, 0] for x in m.head_scores(cache, obs))  # [L, K, S]
  small = methods.compress(m, cache, obs)
  lens = np.asarray(small.lengths)[:, 0]  # [L, K]
  uniform, alpha, n = 40, 0.2, len(ids)
  n_forced = np.minimum(forced[..., :n].sum(-1), uniform)
  b = uniform - n_forced
  moved = False
  for l in range(lens.shape[0]):
    s = free[l, :, :n]
    flat = np.sort(s.ravel())[::-1]
    total = int(b[l].sum())
    assert total > 0
    cut = flat[total - 1]
    # Count winners as top_total does: strictly above the cut, then ties by index.
    above = s > cut
    room = total - above.sum()
    tied = np.cumsum((s == cut).ravel()).reshape(s.shape) <= room
    cnt = (above | ((s == cut) & tied)).sum(-1)
    want = np.minimum(np.round(cnt * (1 - alpha) + alpha * b[l]) + n_forced[l], n)
    np.testing.assert_array_equal(lens[l], want, err_msg=f"layer {l}")
    moved |= len(set(lens[l].tolist())) > 1
    for k in range(lens.shape[1]):
      p = set(np.asarray(small.positions[l, 0, k, : lens[l, k]]).tolist())
      order = np.argsort(-scores[l, k, :n], kind="stable")
      assert p == set(order[: lens[l, k]].tolist()), (l, k)  # each head keeps its own top
  if scorer in ("snapkv", "tova", "h2o", "keyformer", "knorm", "expected_attention", "kvzip"):
    assert moved  # scores that differ by head move budget between heads
  np.testing.assert_allclose(lens.sum(-1), uniform * lens.shape[1], atol=lens.shape[1])


@pytest.mark.parametrize("gqa", ["mean", "max"])
def test_tova_head_scores_reduce_the_query_group(tiny, gqa):
  """TOVA's per-kv-head scores (AdaKV's): the last query's softmax over the prompt, per query
  head in numpy, reduced over each kv head's group by ``gqa``; TOVA's own scores stay the mean
  over every head of the layer."""
  ids = np.random.RandomState(14).randint(0, 160, size=27).tolist()
  c = tiny.config
  n, g = len(ids), c.num_heads // c.num_kv_heads
  cache, q_all = _prefill(tiny, ids, 64, _all_queries)
  q = np.asarray(q_all)[0][:, 0, n - 1].astype(np.float64)  # [L, N, H]: the last query
  keys = np.asarray(cache.keys)[:, 0, :, :n].astype(np.float64)  # [L, K, n, H]
  z = np.einsum("lkgh,lksh->lkgs", q.reshape(c.num_layers, c.num_kv_heads, g, -1), keys)
  p = np.exp(z / np.sqrt(c.head_dim) - (z / np.sqrt(c.head_dim)).max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)  # [L, K, G, n]
  m = methods.make(f"tova:gqa={gqa}", ratio=0.5)
  _, obs = _prefill(tiny, ids, 8, m.observe)
  got = np.asarray(m.head_scores(cache, obs))[:, 0, :, :n]
  np.testing.assert_allclose(got, p.mean(2) if gqa == "mean" else p.max(2), rtol=1e-4,
                             atol=1e-7)
  layer = np.asarray(m.scores(cache, obs))[:, 0, :, :n]
  np.testing.assert_allclose(layer, np.broadcast_to(p.mean((1, 2))[:, None], layer.shape),
                             rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["snapkv", "tova", "expected_attention", "adakv"])
def test_gqa_option_is_checked(name):
  assert methods.make(f"{name}:gqa=max", ratio=0.5).gqa == "max"
  with pytest.raises(ValueError, match="gqa .* must be one of mean, max.*gqa=max"):
    methods.make(f"{name}:gqa=sum", ratio=0.5)


def test_adakv_scorer_options_and_errors():
  tova = methods.make("adakv:scorer=tova", ratio=0.5)
  assert isinstance(tova.inner, methods.TOVA) and tova.inner.ratio == 0.5
  assert methods.make("adakv", ratio=0.5).inner is None  # the built-in SnapKV scores
  assert methods.make("adakv:scorer=tova:gqa=max", ratio=0.5).inner.gqa == "max"
  # The scorer's compress-during-prefill hooks come through; hasattr sees the ones it lacks.
  assert hasattr(methods.make("adakv:scorer=h2o", ratio=0.5), "carried_scores")
  assert hasattr(methods.make("adakv:scorer=expected_attention", ratio=0.5), "accumulate")
  assert not hasattr(tova, "carried_scores") and not hasattr(tova, "accumulate")
  assert not hasattr(tova, "update")  # prefill only: a ragged cache evicts nothing later
  with pytest.raises(ValueError, match="scorer must be one of .*tova"):
    methods.make("adakv:scorer=kivi", ratio=0.5)
  with pytest.raises(ValueError, match="scorer must be one of"):
    methods.make("adakv:scorer=pyramidkv", ratio=0.5)
  with pytest.raises(ValueError, match=r"alpha .* \[0, 1\]"):
    methods.make("adakv:alpha=1.5", ratio=0.5)


def _pre_queries(layer, x, cache):
  return x.q_pre


@pytest.mark.parametrize("gqa", ["mean", "max"])
def test_expected_attention_matches_formula(tiny, gqa):
  """Gaussian expected attention from all pre-RoPE prompt queries, straight in numpy; each kv
  head's query group reduced by ``gqa``."""
  from kvlab.lib.rope import base_inv_freq  # pylint: disable=g-import-not-at-top

  ids = np.random.RandomState(12).randint(0, 160, size=30).tolist()
  c = tiny.config
  n, h, sinks, fut = len(ids), c.head_dim, 4, 16
  cache, qpre = _prefill(tiny, ids, 64, _pre_queries)
  q = np.asarray(qpre)[0][:, 0, :n].astype(np.float64)  # [L, n, N, H]
  keys = np.asarray(cache.keys)[:, 0, :, :n].astype(np.float64)  # [L, K, n, H]
  vals = np.asarray(cache.values)[:, 0, :, :n].astype(np.float64)
  inv = base_inv_freq(c.rope).astype(np.float64)
  ang = np.arange(n, n + fut)[:, None] * inv[None]
  cos = np.concatenate([np.cos(ang), np.cos(ang)], -1)
  sin = np.concatenate([np.sin(ang), np.sin(ang)], -1)
  rot = np.zeros((h, h))
  rot[h // 2:, : h // 2] = np.eye(h // 2)
  rot[: h // 2, h // 2:] = -np.eye(h // 2)
  r = np.mean([np.diag(cc) + np.diag(ss) @ rot for cc, ss in zip(cos, sin)], 0)
  g = c.num_heads // c.num_kv_heads
  want = np.zeros((c.num_layers, c.num_kv_heads, n)) if gqa == "mean" else np.full(
      (c.num_layers, c.num_kv_heads, n), -np.inf)
  for l in range(c.num_layers):
    for head in range(c.num_heads):
      qs = q[l, sinks:, head]
      mu = qs.mean(0)
      cov = (qs - mu).T @ (qs - mu) / len(qs)
      mu, cov = r @ mu, r @ cov @ r.T
      k = keys[l, head // g, sinks:]
      z = k @ mu / np.sqrt(h) + np.einsum("sh,hj,sj->s", k, cov, k) / (2 * h)
      p = np.exp(z - z.max())
      p = p / p.sum()
      if gqa == "mean":
        want[l, head // g, sinks:] += p / g
      else:
        want[l, head // g, sinks:] = np.maximum(want[l, head // g, sinks:], p)
  want[..., sinks:] *= np.linalg.norm(vals[..., sinks:, :], axis=-1)
  want[..., :sinks] = np.inf
  m = methods.make(f"expected_attention:future={fut}:sinks={sinks}:gqa={gqa}", ratio=0.5)
  cache8, obs = _prefill(tiny, ids, 8, m.observe)  # chunked moments
  got = np.asarray(m.scores(cache8, obs))[:, 0, :, :n]
  np.testing.assert_allclose(got[..., sinks:], want[..., sinks:], rtol=2e-3, atol=1e-6)
  assert np.isinf(got[..., :sinks]).all()
  # In a batch with a shorter second row, row 0 scores the same as alone.
  tokens, lengths = gen.pad_batch([ids, ids[:17]], 8)
  cache2 = tiny.new_cache(2, tokens.shape[1])
  _, cache2, obs2 = gen.prefill(tiny.params, jnp.asarray(tokens), jnp.asarray(lengths), cache2,
                                apply_fn=tiny.apply_fn, chunk_size=8, observe=m.observe)
  got2 = np.asarray(m.scores(cache2, obs2))[:, 0, :, :n]
  np.testing.assert_allclose(got2[..., sinks:], got[..., sinks:], rtol=1e-4, atol=1e-7)


def _decode(m, cache, logits, n, method=None):
  import jax  # pylint: disable=g-import-not-at-top
  out, _, cache = gen.decode_loop(m.params, cache, logits, jax.random.PRNGKey(0),
                                  apply_fn=m.apply_fn, max_new_tokens=n, method=method)
  return np.asarray(out[0]).tolist(), cache


@pytest.mark.parametrize("name", ["h2o", "tova"])
def test_decode_time_eviction_keeps_a_fixed_size_cache(tiny, name):
  ids = np.random.RandomState(13).randint(0, 160, size=20).tolist()
  method = methods.make(name, budget=10)
  tokens, lengths = gen.pad_batch([ids], 8)
  cache = tiny.new_cache(1, 24)
  logits, cache, obs = gen.prefill(tiny.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                                   apply_fn=tiny.apply_fn, chunk_size=8, observe=method.observe)
  small = methods.compress(method, cache, obs, extra=6)  # capacity 16: evicts after 6 tokens
  assert small.capacity == 16
  out, final = _decode(tiny, small, logits, 30, method)
  assert len(out) == 30
  lens = np.asarray(final.lengths)
  assert (lens == 15).all()  # full minus the one free slot, for every layer and head
  pos = np.asarray(final.positions)[..., :15]
  assert all(len(set(p)) == 15 for p in pos.reshape(-1, 15))  # no duplicated token
  assert (pos.max(-1) == 20 + 30 - 2).all()  # the newest token (the last one fed) is kept
  if name == "tova":  # layer-wise: every kv head of a layer keeps the same tokens
    assert all((np.sort(p, -1) == np.sort(p[:1], -1)).all() for p in pos[:, 0])
  else:
    assert final.scores is not None and final.scores.shape == final.keys.shape[:4]


def test_decode_time_methods_change_nothing_until_the_cache_is_full(tiny):
  ids = np.random.RandomState(14).randint(0, 160, size=20).tolist()
  for name in ("h2o", "tova"):
    method = methods.make(name, budget=12)
    tokens, lengths = gen.pad_batch([ids], 8)
    cache = tiny.new_cache(1, 24)
    logits, cache, obs = gen.prefill(tiny.params, jnp.asarray(tokens), jnp.asarray(lengths),
                                     cache, apply_fn=tiny.apply_fn, chunk_size=8,
                                     observe=method.observe)
    roomy = methods.compress(method, cache, obs, extra=20)
    plain = jax_copy(roomy)
    a, _ = _decode(tiny, roomy, logits, 10, method)
    b, _ = _decode(tiny, plain, logits, 10, None)
    assert a == b


def jax_copy(cache):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(jnp.copy, cache)


@pytest.mark.parametrize("tau", [0.7, 1.0])
def test_keyformer_column_sums_equal_dense_gumbel_softmax(tiny, tau):
  """Blockwise, chunked Gumbel-softmax sums (formed in the attention pass: tau 1 reweights the
  softmax's own terms, other taus keep a second running max) == a dense
  softmax((s + G) / tau) with the same hashed noise, over the whole prompt."""
  from kvlab.lib.methods.accumulated import gumbel_noise  # pylint: disable=g-import-not-at-top
  ids = np.random.RandomState(12).randint(0, 160, size=29).tolist()
  c = tiny.config
  seed = 3
  m = methods.Keyformer(ratio=0.5, tau=tau, seed=seed)
  cache, obs = _prefill(tiny, ids, 8, m.observe)  # 4 chunks, attention blocks of 8
  got = np.asarray(obs.sum(0))[:, 0, :, :29]  # [L, K, n]
  _, q_all = _prefill(tiny, ids, 64, _all_queries)
  n = len(ids)
  q = np.asarray(q_all)[0][:, 0, :n]
  keys = np.asarray(cache.keys)[:, 0, :, :n]
  g = c.num_heads // c.num_kv_heads
  for layer in range(c.num_layers):
    qq = q[layer].reshape(n, c.num_kv_heads, g, -1)
    s = np.einsum("nkgh,ksh->kgns", qq, keys[layer]) / np.sqrt(c.head_dim)
    heads = (np.arange(c.num_kv_heads)[:, None] * g + np.arange(g)[None])[..., None, None]
    noise = np.asarray(gumbel_noise(seed, layer, heads, np.arange(n)[:, None],
                                    np.arange(n)[None, :]))
    z = np.where(np.tril(np.ones((n, n), bool)), (s + noise) / tau, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(got[layer], p.sum(2).mean(1), rtol=2e-4, atol=2e-5)
  u = np.asarray(gumbel_noise(0, 0, 0, np.arange(4096), 7))
  assert abs(u.mean() - 0.5772) < 0.06 and abs(u.std() - 1.2825) < 0.08  # Gumbel moments


@pytest.mark.parametrize("cap,window,tau", [(40, None, 0.7), (37, None, 1.0), (40, 9, 1.0),
                                            (37, 9, 0.7)])
def test_column_sums_from_the_attentions_probabilities_equal_the_hooks_own_pass(cap, window,
                                                                               tau):
  """H2O's column sums formed from the probabilities the attention kept (the default path),
  and Keyformer's from the Gumbel-softmax kept beside them (tau 1 and not), equal the hooks'
  separate blockwise passes: ragged head lengths, a
  capacity that is not a multiple of the block (the last block overlaps), padded queries, a
  sliding window."""
  from kvlab.lib.attention import LayerInputs, chunk_attention  # pylint: disable=g-import-not-at-top
  from kvlab.lib.cache import KVCache  # pylint: disable=g-import-not-at-top
  from kvlab.lib.methods import accumulated as acc  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(5)
  l_, b, kh, g, t, h = 2, 2, 2, 3, 6, 8
  lens = jnp.asarray(rng.randint(0, 31, size=(l_, b, kh)), jnp.int32)
  pos = jnp.where(jnp.arange(cap) < lens[..., None], jnp.arange(cap), -1).astype(jnp.int32)
  cache = KVCache(keys=jnp.asarray(rng.randn(l_, b, kh, cap, h), jnp.float32),
                  values=jnp.asarray(rng.randn(l_, b, kh, cap, h), jnp.float32),
                  positions=pos, lengths=lens, next_position=jnp.full((b,), 31, jnp.int32))
  q = jnp.asarray(rng.randn(b, t, kh * g, h), jnp.float32)
  k_new = jnp.asarray(rng.randn(b, kh, t, h), jnp.float32)
  v_new = jnp.asarray(rng.randn(b, kh, t, h), jnp.float32)
  qpos = jnp.broadcast_to(31 + jnp.arange(t, dtype=jnp.int32), (b, t))
  valid = jnp.asarray([[True] * t, [True] * 4 + [False] * 2])
  spec = (tau, 3)  # Keyformer's tau and seed
  for layer in range(l_):
    lay = jnp.int32(layer)
    out, lse, kept, gkept = chunk_attention(
        q, k_new, v_new, cache.keys, cache.values, cache.positions, cache.lengths, qpos,
        layer=lay, sliding_window=window, block_size=8, return_lse=True, return_probs=True,
        gumbel_probs=spec)
    plain_out = chunk_attention(q, k_new, v_new, cache.keys, cache.values, cache.positions,
                                cache.lengths, qpos, layer=lay, sliding_window=window,
                                block_size=8)
    np.testing.assert_allclose(out, plain_out, rtol=1e-6, atol=1e-6)  # output unchanged
    x = LayerInputs(q, k_new, v_new, q, k_new, qpos, valid, jnp.ones((h // 2,)), lse, kept,
                    window, gkept)
    want = np.asarray(acc._column_sums(lay, x, cache, block=8))
    got = np.asarray(acc.column_sums(impl="kept")(lay, x, cache))  # the CPU default
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    got_k = np.asarray(acc.column_sums(impl="interpret")(lay, x, cache))  # the GPU default
    np.testing.assert_allclose(got_k, want, rtol=2e-5, atol=1e-6)
    assert got.sum() > 1.0  # something was summed
    # Keyformer: the Gumbel-softmax kept beside the attention == the hook's own two passes.
    want_g = np.asarray(acc._column_sums(lay, x, cache, block=8, gumbel=spec))
    got_g = np.asarray(acc.column_sums(*spec, impl="kept")(lay, x, cache))
    np.testing.assert_allclose(got_g, want_g, rtol=2e-5, atol=1e-6)
    got_gk = np.asarray(acc.column_sums(*spec, impl="interpret")(lay, x, cache))
    np.testing.assert_allclose(got_gk, want_g, rtol=2e-5, atol=1e-6)
    assert np.abs(got_g - got).max() > 1e-3  # the noise changed the sums
    # Another setting's hook does not take these probabilities: it makes its own pass.
    np.testing.assert_allclose(acc.column_sums(tau, 4, impl="kept")(lay, x, cache),
                               acc._column_sums(lay, x, cache, block=8, gumbel=(tau, 4)),
                               rtol=1e-6, atol=1e-7)
  kept = lambda *a: acc.column_sums(*a, impl="kept")
  assert kept().wants_probs and not kept(1.0, 0).wants_probs
  assert kept(1.0, 0).wants_gumbel_probs == (1.0, 0) and kept().wants_gumbel_probs is None
  fused = acc.column_sums(1.0, 0, impl="interpret")  # the kernel keeps nothing in attention
  assert not fused.wants_probs and fused.wants_gumbel_probs is None
  with pytest.raises(ValueError, match="plain cache"):
    chunk_attention(q, k_new, v_new, cache.keys, cache.values, cache.positions, cache.lengths,
                    qpos, layer=jnp.int32(0), quant=object(), return_probs=True)
  with pytest.raises(ValueError, match="plain cache"):
    chunk_attention(q, k_new, v_new, cache.keys, cache.values, cache.positions, cache.lengths,
                    qpos, layer=jnp.int32(0), quant=object(), gumbel_probs=spec)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_top_total_is_the_first_total_of_a_stable_descending_argsort(rows, n, seed):
  """AdaKV's allocation by one sort (``top_total``) picks what ranking by two stable argsorts
  picked, ties (many: small integer scores) and -inf included."""
  from kvlab.lib.methods.budgets import top_total  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(seed)
  flat = rng.randint(0, 4, size=(rows, n)).astype(np.float32)
  flat[rng.rand(rows, n) < 0.2] = -np.inf
  total = rng.randint(0, n + 3, size=rows)
  rank = np.argsort(np.argsort(-flat, axis=-1, kind="stable"), axis=-1, kind="stable")
  want = rank < total[:, None]
  np.testing.assert_array_equal(np.asarray(top_total(jnp.asarray(flat), jnp.asarray(total))),
                                want)
