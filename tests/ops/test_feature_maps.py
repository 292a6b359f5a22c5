"""Feature maps: the kernels they stand for."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers.ops import feature_maps


def test_taylor_kernel_is_second_order_exp():
  q, k = jax.random.normal(jax.random.key(0), (2, 7, 5)) * 0.5
  dot = jnp.sum(q * k, -1)
  phi = jnp.sum(feature_maps.taylor_exp(q) * feature_maps.taylor_exp(k), -1)
  np.testing.assert_allclose(phi, 1 + dot + dot ** 2 / 2, rtol=1e-5)
  assert feature_maps.taylor_exp(q).shape == (7, 1 + 5 + 25)


def test_cosformer_kernel_depends_on_distance():
  x = jax.random.normal(jax.random.key(1), (2, 6))
  q, k = (jnp.broadcast_to(a, (1, 11, 1, 6)) for a in x)  # the same vectors at every position
  pos = jnp.arange(11)
  pq, pk = feature_maps.cosformer(q, pos, 20), feature_maps.cosformer(k, pos, 20)
  scores = jnp.einsum("bthd,bshd->ts", pq, pk)
  base = jnp.sum(jax.nn.relu(x[0]) * jax.nn.relu(x[1]))
  expected = base * jnp.cos(jnp.pi / 2 * (pos[:, None] - pos[None, :]) / 20)
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


def test_positive_maps_and_hedgehog():
  x = jax.random.normal(jax.random.key(2), (3, 4, 2, 8))
  assert bool(jnp.all(feature_maps.elu_plus_one(x) > 0))
  assert bool(jnp.all(feature_maps.relu(x) >= 0))
  w = jax.random.normal(jax.random.key(3), (2, 8, 5))
  h = feature_maps.hedgehog(x, w)
  assert h.shape == (3, 4, 2, 10)
  np.testing.assert_allclose(h[..., :5].sum(-1), 1, rtol=1e-5)
  np.testing.assert_allclose(h[..., 5:].sum(-1), 1, rtol=1e-5)


def test_unknown_name_lists_valid():
  with pytest.raises(ValueError, match="valid names: elu, identity, relu, taylor"):
    feature_maps.get("softmax")
