import jax.numpy as jnp
import numpy as np

from kvlab.lib.cache import KVCache


def test_init_nbytes_from_leaves():
  c = KVCache.init(num_layers=2, batch=3, kv_heads=4, capacity=16, head_dim=8, dtype=jnp.bfloat16)
  kv = 2 * 2 * 3 * 4 * 16 * 8 * 2
  meta = 2 * 3 * 4 * 16 * 4 + 2 * 3 * 4 * 4 + 3 * 4
  assert c.nbytes == kv + meta
  small = KVCache.init(num_layers=2, batch=3, kv_heads=4, capacity=8, head_dim=8,
                       dtype=jnp.bfloat16)
  assert small.nbytes < c.nbytes


def test_append_writes_per_row_lengths_and_positions():
  c = KVCache.init(num_layers=1, batch=2, kv_heads=1, capacity=8, head_dim=2)
  k = jnp.arange(1 * 2 * 1 * 3 * 2, dtype=jnp.float32).reshape(1, 2, 1, 3, 2) + 1
  c = c.append(k, k, jnp.asarray([3, 1]))
  np.testing.assert_array_equal(c.lengths[0, :, 0], [3, 1])
  np.testing.assert_array_equal(c.next_position, [3, 1])
  np.testing.assert_array_equal(c.positions[0, 0, 0, :4], [0, 1, 2, -1])
  np.testing.assert_array_equal(c.positions[0, 1, 0, :2], [0, -1])
  # Row 1's padded tokens are overwritten by the next append.
  c = c.append(k[:, :, :, :1] * 0 - 5, k[:, :, :, :1], jnp.asarray([1, 1]))
  np.testing.assert_array_equal(c.keys[0, 1, 0, 1], [-5, -5])
  np.testing.assert_array_equal(c.positions[0, 1, 0, :3], [0, 1, -1])
  np.testing.assert_array_equal(c.lengths[0, :, 0], [4, 2])
