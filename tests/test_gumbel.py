"""Keyformer's hashed Gumbel noise stays finite for every hash value."""

import jax.numpy as jnp
import numpy as np

from lib.gumbel import gumbel_noise, gumbel_uniform, gumbel_weight


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
