"""Keyformer's hashed Gumbel noise stays finite for every hash value."""

import jax.numpy as jnp
import numpy as np

from kvlab.lib.gumbel import gumbel_noise, gumbel_uniform, gumbel_weight, hash_salts, noise_of_hash


def test_noise_and_weight_are_finite_over_every_hash_value():
  # 2^24 query positions for fixed (seed, layer, head, key): with 24-bit uniforms one of them
  # (this very coordinate set) rounded to u = 1.0, an infinite weight and NaN column sums
  q = jnp.arange(1 << 24, dtype=jnp.uint32)
  u = np.asarray(gumbel_uniform(0, 3, 5, q, 7))
  assert u.min() > 0 and u.max() < 1
  assert u.max() == np.float32(1 - 2.0 ** -24)
  w = np.asarray(gumbel_weight(0, 3, 5, q, 7))
  g = np.asarray(gumbel_noise(0, 3, 5, q, 7))
  assert np.isfinite(w).all() and np.isfinite(g).all()
  assert w.max() < 3.4e7 and -3 < g.min() and g.max() < 17.5
  np.testing.assert_allclose(np.log(w), g, rtol=1e-5, atol=1e-5)  # the same noise, two forms
  # and it is uniform: the mean of u and of G (Euler-Mascheroni) over 2^24 draws
  assert abs(u.mean() - 0.5) < 1e-3 and abs(g.mean() - 0.5772) < 2e-3


def test_noise_is_unchanged_by_the_split_hash():
  """Values from the formula before the hash was split into row / slot salts (``7fb3fec``, which
  every keyformer leaderboard row ran): the split must not move the noise, and the kernel's
  ``noise_of_hash(row ^ col)`` is the same function."""
  qp, kp = np.array([0, 5, 4095, 123456]), np.array([0, 7, 4000, 99])
  want = [0.9518066644668579, -0.9495810270309448, 0.5679123997688293, -0.42145612835884094]
  np.testing.assert_array_equal(np.asarray(gumbel_noise(3, 11, 7, qp, kp)), np.float32(want))
  want = [-2.8115408420562744, -0.9041723012924194, 0.7964755296707153, -1.2509000301361084]
  got = np.asarray(gumbel_noise(0, 0, 0, qp[:, None], kp[None])).ravel()[:4]
  np.testing.assert_array_equal(got, np.float32(want))
  row, col = hash_salts(3, 11, 7, qp, kp)
  np.testing.assert_array_equal(np.asarray(noise_of_hash(row ^ col)),
                                np.asarray(gumbel_noise(3, 11, 7, qp, kp)))
