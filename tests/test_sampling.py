import jax
import jax.numpy as jnp
import numpy as np

from kvlab.lib.sampling import SamplingConfig, sample


def test_greedy_is_argmax():
  logits = jnp.asarray([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
  np.testing.assert_array_equal(sample(logits, jax.random.PRNGKey(0), SamplingConfig()), [1, 0])


def test_top_k_and_top_p_restrict_support():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  draw = lambda cfg: {int(sample(logits, k, cfg)[0]) for k in keys}
  assert draw(SamplingConfig(temperature=1.0, top_k=2)) == {0, 1}
  assert draw(SamplingConfig(temperature=1.0, top_p=0.7)) == {0, 1}
  assert draw(SamplingConfig(temperature=1.0)) == {0, 1, 2, 3}


def test_temperature_sharpens():
  logits = jnp.log(jnp.asarray([[0.6, 0.4]]))
  keys = jax.random.split(jax.random.PRNGKey(1), 2000)
  frac = lambda t: np.mean([int(sample(logits, k, SamplingConfig(temperature=t))[0]) == 0
                            for k in keys[:500]])
  assert frac(0.2) > frac(1.0) + 0.15
