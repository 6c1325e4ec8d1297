"""Capacity safety on every store (issue 33 item 2): a compressed cache reports the tokens it can
still take (``KVCache.free_slots``) exactly enough that decoding that many keeps every token
(each position held once, nothing overwritten), and one more is refused before any work, with
an error naming the fix. Run for the plain, quantized (KIVI: window + packed store), paged
(AdaKV ragged pages) and composed (evict then quantize; evict then evict) caches, greedy and
sampled, and for decode-time eviction (TOVA, H2O: one free slot is enough)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvlab
from kvlab.lib import generate as gen

PROMPTS = [list(np.random.RandomState(0).randint(0, 160, size=n)) for n in (96, 71)]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  path, _ = tiny_dir("llama_tied_bias")  # 4 kv heads: AdaKV budgets differ between them
  return kvlab.load(path, progress=False, attn_block_size=8)


def _prefill(lm, method):
  """``(last_logits [B, V], full cache, observations for method)`` of PROMPTS."""
  tokens, lengths = gen.pad_batch(PROMPTS, 8)
  cache = lm.new_cache(len(PROMPTS), tokens.shape[1])
  return gen.prefill(lm.params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                     apply_fn=lm.apply_fn, chunk_size=8, observe=method.observe)


def _held_positions(cache) -> list[np.ndarray]:
  """Per (layer, row, head): the positions held in the window and in any store, concatenated."""
  win_p, win_n = np.asarray(cache.positions), np.asarray(cache.lengths)
  store = cache.quant
  if store is not None and hasattr(store, "dense"):  # paged
    _, _, st_p = store.dense()
    st_p, st_n = np.asarray(st_p), np.asarray(store.lengths)
  elif store is not None and hasattr(store, "positions"):  # quantized
    st_p, st_n = np.asarray(store.positions), np.asarray(store.lengths)
  else:
    st_p, st_n = None, None
  held = []
  for idx in np.ndindex(*win_n.shape):
    parts = [win_p[idx][: win_n[idx]]]
    if st_p is not None:
      parts.insert(0, st_p[idx][: st_n[idx]])
    held.append(np.concatenate(parts))
  return held


def _decode(lm, cache, logits, n, **kw):
  return gen.decode_loop(lm.params, cache, logits, jax.random.PRNGKey(0), apply_fn=lm.apply_fn,
                         max_new_tokens=n, **kw)


# (spec, room): each store with no room and with some; composition members with room.
CASES = [("knorm", 0), ("knorm", 21), ("kivi4:group=16:residual=16", 0),
         ("kivi4:group=16:residual=16", 21), ("snapkv+kivi4:group=16:residual=16", 21),
         ("adakv:window=8:page=8", 0), ("adakv:window=8:page=8", 21), ("tova:ratio=0.7+knorm", 21)]


def _row(flat: int, cache) -> int:
  return np.unravel_index(flat, np.asarray(cache.lengths).shape)[1]


@pytest.mark.parametrize("spec,room", CASES)
def test_free_slots_are_exactly_usable_and_one_more_is_refused(tiny, spec, room):
  """Decoding ``free_slots() + 1`` tokens (the last one is not appended) fills the cache: every
  token written lands in a slot of its own; ``free_slots() + 2`` is refused up front."""
  method = kvlab.methods.make(spec, ratio=1.0 if spec.startswith("kivi") else 0.5)
  logits, full, obs = _prefill(tiny, method)
  small = kvlab.compress(method, full, obs, room=room)
  free = small.free_slots()
  assert free >= room  # the room asked for is there (stores round it up)
  before = _held_positions(small)
  for sampling in (gen.SamplingConfig(), gen.SamplingConfig(temperature=1.0)):
    with pytest.raises(ValueError, match=f"{free} free slots.*decoding {free + 2} tokens"):
      _decode(tiny, small, logits, free + 2, sampling=sampling)
  _, n_gen, out = _decode(tiny, small, logits, free + 1)
  assert (np.asarray(n_gen) == free + 1).all()
  for flat, (old, new) in enumerate(zip(before, _held_positions(out))):
    start = len(PROMPTS[_row(flat, out)])
    expect = np.concatenate([old, np.arange(start, start + free)])
    np.testing.assert_array_equal(np.sort(new), np.sort(expect))  # nothing overwritten or lost


@pytest.mark.parametrize("spec", ["tova", "h2o"])
def test_decode_time_eviction_needs_one_free_slot(tiny, spec):
  """A method that evicts while decoding keeps the cache at its capacity: 60 tokens decode
  through a cache with one free slot, the length never passes the capacity and the newest
  appended token is always held; with no free slot the first step is refused."""
  method = kvlab.methods.make(spec, ratio=0.5)
  logits, full, obs = _prefill(tiny, method)
  small = kvlab.compress(method, full, obs, room=1)
  _, n_gen, out = _decode(tiny, small, logits, 60, method=method)
  assert (np.asarray(n_gen) == 60).all()
  assert out.capacity == small.capacity and int(np.asarray(out.lengths).max()) <= out.capacity
  for flat, held in enumerate(_held_positions(out)):
    assert len(PROMPTS[_row(flat, out)]) + 58 in held  # the last appended token
  stuck = small.replace(lengths=jnp.full_like(small.lengths, small.capacity))
  with pytest.raises(ValueError, match="0 free slots"):
    _decode(tiny, stuck, logits, 4, method=method)


def test_prefill_into_a_compressed_cache_is_checked(tiny):
  """Appending a question to a compressed cache (the low-level path) is refused when the
  padded question does not fit, naming ``room``."""
  method = kvlab.methods.make("kivi4:group=16:residual=16")
  _, full, _ = _prefill(tiny, method)
  small = kvlab.compress(method, full, None, room=8)
  q = jnp.zeros((2, 64), jnp.int32)
  with pytest.raises(ValueError, match="padded prompt of 64 tokens.*room"):
    gen.prefill(tiny.params, q, jnp.asarray([64, 64], jnp.int32), small,
                apply_fn=tiny.apply_fn, chunk_size=8)
