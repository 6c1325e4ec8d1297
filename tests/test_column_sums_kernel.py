"""The fused column-sum kernel (H2O's accumulated attention) == its dense jnp reference, and the
H2O hook that takes it == the kept-probability path through a model. Interpret mode on CPU;
compiled (Triton) where JAX's default backend is a GPU, so the same suite checks the real kernel
there."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvlab import models
from kvlab.lib import generate as gen
from kvlab.lib import methods
from kvlab.lib.methods import accumulated as acc
from kvlab.pallas_kernels.column_sums import (column_sums, column_sums_reference, row_lse,
                                        row_lse_reference)

INTERPRET = jax.default_backend() == "cpu"  # compiled on GPU
FUSED = "interpret" if INTERPRET else "kernel"  # the hooks' path through the kernel, likewise


def _case(rng, b, k, r, s, h, dtype, positions):
  q = rng.randn(b, k, r, h)
  keys = rng.randn(b, k, s, h)
  # lse from the dense softmax of each row over every allowed key, as attention would give it
  # (so the sums are attention probabilities, at most 1 per row)
  q_pos = rng.randint(0, positions, size=(b, k, r)).astype(np.int32)
  k_pos = rng.randint(0, positions, size=(b, k, s)).astype(np.int32)
  lse = np.log(np.exp(np.einsum("bkrh,bksh->bkrs", q, keys) / np.sqrt(h)
                      ).sum(-1)) + rng.rand(b, k, r)
  cast = lambda a: jnp.asarray(a, dtype)
  return dict(q=cast(q), lse=jnp.asarray(lse, jnp.float32), q_pos=jnp.asarray(q_pos),
              w=jnp.asarray((rng.rand(b, k, r) > 0.2) / 3, jnp.float32), keys=cast(keys),
              k_pos=jnp.asarray(k_pos), k_ok=jnp.asarray(rng.rand(b, k, s) > 0.3))


@settings(max_examples=6, deadline=None)
@given(b=st.integers(1, 2), k=st.integers(1, 4), r=st.integers(1, 150), s=st.integers(1, 200),
       h=st.sampled_from((16, 64)), window=st.sampled_from((None, 1, 17)),
       bf16=st.booleans(), blocks=st.sampled_from(((16, 16), (32, 64), (64, 32))),
       seed=st.integers(0, 2**16))
def test_kernel_matches_reference(b, k, r, s, h, window, bf16, blocks, seed):
  """Rows and slots not multiples of the blocks, an empty key block (all slots invalid), padded
  rows (weight 0), a sliding window; bf16 inputs (their products are exact in float32)."""
  rng = np.random.RandomState(seed)
  case = _case(rng, b, k, r, s, h, jnp.bfloat16 if bf16 else jnp.float32, 120)
  if s > 32:
    case["k_ok"] = case["k_ok"].at[:, :, :32].set(False)
  ref = column_sums_reference(**case, window=window)
  out = column_sums(**case, window=window, interpret=INTERPRET, block_q=blocks[0],
                    block_k=blocks[1])
  assert out.shape == (b, k, s) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-6)
  if s > 32:
    assert not np.asarray(out)[:, :, :32].any()  # invalid slots get nothing


def test_gpu_padding_interpreted_and_bad_shapes():
  """The Triton-padded shapes (rows to a power of two), run by the interpreter on CPU; one clear
  error for shapes Triton cannot take and for mismatched inputs."""
  case = _case(np.random.RandomState(1), 1, 2, 50, 70, 16, jnp.float32, 90)
  ref = column_sums_reference(**case)
  out = column_sums(**case, interpret=True, platform="gpu", block_q=16, block_k=32)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-6)
  assert float(ref.sum()) > 1.0
  with pytest.raises(ValueError, match="powers of two"):
    column_sums(**case, interpret=True, platform="gpu", block_q=24)
  with pytest.raises(ValueError, match="lse"):
    column_sums(**dict(case, lse=case["lse"][..., :-1]), interpret=True)
  if jax.default_backend() == "cpu":
    with pytest.raises(NotImplementedError, match="interpret=True"):
      column_sums(**case)


@pytest.mark.parametrize("partitions", [1, 2, 5, None])
@pytest.mark.parametrize("tau,platform", [(None, None), (1.0, None), (0.7, "gpu")])
def test_row_lse_split_over_key_partitions_matches_reference(partitions, tau, platform):
  """Keyformer's row pass split-K: each partition's online (max, sum) over its run of key
  blocks, merged after, == the dense normaliser; plain and Gumbel logits, an empty leading key
  block, a sliding window, rows with nothing allowed (lse 0), and the Triton-padded shapes."""
  from kvlab.lib.gumbel import hash_salts  # pylint: disable=g-import-not-at-top
  case = _case(np.random.RandomState(5), 2, 3, 70, 150, 16, jnp.float32, 130)
  case["k_ok"] = case["k_ok"].at[:, :, :16].set(False)
  args = (case["q"], case["q_pos"], case["keys"], case["k_pos"], case["k_ok"])
  salts = None if tau is None else hash_salts(3, 1, 2, case["q_pos"], case["k_pos"])
  kw = dict(window=40, tau=tau, salts=salts)
  ref = np.asarray(row_lse_reference(*args, **kw))
  interp = INTERPRET or platform == "gpu"
  out = np.asarray(row_lse(*args, **kw, interpret=interp, platform=platform, block_q=16,
                           block_k=16, partitions=partitions))
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
  assert (ref == 0).any() and (ref != 0).any()  # rows with nothing allowed, and the rest


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  path, _ = tiny_dir("llama")
  return models.load(path, progress=False, attn_block_size=8)


@pytest.mark.parametrize("name", ["h2o", "keyformer"])
def test_hooks_with_the_kernel_equal_the_kept_probabilities(tiny, monkeypatch, name):
  """H2O's and Keyformer's observations through the model's chunked prefill: the kernel path
  (``FUSED``: interpreted on CPU, compiled on a GPU) == the kept-probability path == the hook's own pass, and the same
  tokens are kept; a padded second row (ragged lengths) included."""
  rng = np.random.RandomState(3)
  prompts = [rng.randint(0, 160, size=27).tolist(), rng.randint(0, 160, size=19).tolist()]
  tokens, lengths = gen.pad_batch(prompts, 8)
  tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
  got = {}
  for impl in ("kept", "own", FUSED):
    monkeypatch.setattr(acc, "COLUMN_SUMS", impl)
    method = methods.make(name, ratio=0.5)
    assert method.observe.impl == impl
    cache = tiny.new_cache(2, tokens.shape[1])
    _, cache, obs = gen.prefill(tiny.params, tokens, lengths, cache, apply_fn=tiny.apply_fn,
                                chunk_size=8, observe=method.observe)
    got[impl] = (np.asarray(obs), np.asarray(methods.compress(method, cache, obs).positions))
  for impl in ("own", FUSED):
    np.testing.assert_allclose(got[impl][0], got["kept"][0], rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(got[impl][1], got["kept"][1])
  assert got["kept"][0].sum() > 1.0
  one_gpu = jax.default_backend() == "gpu" and jax.device_count() == 1
  assert acc.resolve_impl("auto") == ("kernel" if one_gpu else "kept")
  assert acc.resolve_impl("auto", gumbel=True) == "kept"  # Keyformer: slower kernel path on GPU
  monkeypatch.setattr(acc, "COLUMN_SUMS", "auto")
  assert methods.make("keyformer", ratio=0.5).observe.impl == "kept"
  assert methods.make("h2o", ratio=0.5).observe.impl == ("kernel" if one_gpu else "kept")
  with pytest.raises(ValueError, match="use one of"):
    acc.resolve_impl("fast")


def test_decode_time_and_during_prefill_paths_take_the_kernel_alike(tiny, monkeypatch):
  """The kernel (``FUSED``: compiled on a GPU) in the two other places the hooks run: H2O /
  TOVA evicting one token per decode step (T = 1 rows), and H2O / Keyformer compressing during
  chunked prefill (scores carried per slot). Same tokens and caches as the kept-probability
  path."""
  from kvlab.lib.online import online_capacity, prefill_compressing  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(13)
  ids = rng.randint(0, 160, size=20).tolist()
  prompts = [rng.randint(0, 160, size=n).tolist() for n in (40, 29)]
  c = tiny.config
  got = {}
  for impl in ("kept", FUSED):
    monkeypatch.setattr(acc, "COLUMN_SUMS", impl)
    for name in ("h2o", "tova"):
      method = methods.make(name, budget=10)
      hook = getattr(method, "decode_observe", None) or method.observe  # as decode_loop picks
      assert hook.impl == impl  # the decode-time hook takes this path
      tokens, lengths = gen.pad_batch([ids], 8)
      cache = tiny.new_cache(1, 24)
      logits, cache, obs = gen.prefill(tiny.params, jnp.asarray(tokens), jnp.asarray(lengths),
                                       cache, apply_fn=tiny.apply_fn, chunk_size=8,
                                       observe=method.observe)
      small = methods.compress(method, cache, obs, extra=6)  # evicts after 6 new tokens
      out, _, final = gen.decode_loop(tiny.params, small, logits, jax.random.PRNGKey(0),
                                      apply_fn=tiny.apply_fn, max_new_tokens=16, method=method)
      got[impl, "decode", name] = (np.asarray(out), np.sort(np.asarray(final.positions), -1))
    for name in ("h2o", "keyformer"):
      method = methods.make(name, ratio=0.25)
      tokens, lengths = gen.pad_batch(prompts, 8)
      cap, kept = online_capacity(method, lengths, 8, c.num_layers, c.num_kv_heads)
      _, online = prefill_compressing(
          tiny.params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(kept, jnp.int32),
          apply_fn=tiny.apply_fn, chunk_size=8, method=method, capacity=cap,
          num_layers=c.num_layers, kv_heads=c.num_kv_heads, head_dim=c.head_dim)
      got[impl, "online", name] = (np.asarray(online.lengths),
                                   np.sort(np.asarray(online.positions), -1))
  assert len(got) == 8
  for impl, where, name in got:
    for a, b in zip(got[impl, where, name], got["kept", where, name]):
      np.testing.assert_array_equal(a, b)
  assert (got["kept", "online", "h2o"][0] > 0).all()
  assert got["kept", "decode", "tova"][0].shape == (1, 16)
