"""LightNet layer: decode equals the forward, grid inputs, padding, registry, and its image classifier trains."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixers import build_mixer, models
from mixers.layers.lightnet import LightNet

WIDTH, HEADS = 16, 2


def random_variables(module, x, seed=0):
  """N(0, 0.3^2) values (numpy: no compile) in the shapes of the variables `module.init` would make."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
  return jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype), shapes)


def test_causal_decode_matches_forward_and_padding_does_not_leak():
  x = jax.random.normal(jax.random.key(0), (2, 11, WIDTH))
  layer = build_mixer("lightnet", num_heads=HEADS, chunk_size=4, gate_rank=4)
  assert isinstance(layer, LightNet) and layer.causal
  variables = jax.jit(functools.partial(layer.init, decode=True))(jax.random.key(1), x[:, :5])  # one init: both
  params, cache = variables["params"], variables["cache"]
  forward = jax.jit(lambda xs, m: layer.apply({"params": params}, xs, mask=m))
  full = forward(x, jnp.ones(x.shape[:2], bool))
  step = jax.jit(lambda c, xs: layer.apply({"params": params, "cache": c}, xs, decode=True, mutable=["cache"]))
  outs = []
  for lo, hi in ((0, 5),) + tuple((t, t + 1) for t in range(5, 11)):
    y, mut = step(cache, x[:, lo:hi])
    cache = mut["cache"]
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=2e-5, atol=2e-5)
  assert int(cache["position"]) == 11
  mask = jnp.arange(11)[None, :] >= jnp.array([[3], [0]])  # left padding on the first row
  y = forward(x, mask)
  y_other = forward(jnp.where(mask[..., None], x, -5.0), mask)
  np.testing.assert_allclose(y_other * mask[..., None], y * mask[..., None], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y[1], full[1], rtol=1e-5, atol=1e-6)


def test_non_causal_grid_input_and_padding():
  layer = LightNet(num_heads=HEADS, causal=False, gate_rank=4)
  x = jax.random.normal(jax.random.key(2), (2, 3, 5, WIDTH))
  variables = random_variables(layer, x)
  forward = jax.jit(lambda xs, m: layer.apply(variables, xs, mask=m))
  y = forward(x, jnp.ones(x.shape[:3], bool))
  flat = LightNet(num_heads=HEADS, causal=False, gate_rank=4, grid_shape=(3, 5))
  np.testing.assert_allclose(jax.jit(flat.apply)(variables, x.reshape(2, 15, WIDTH)), y.reshape(2, 15, WIDTH),
                             rtol=1e-5, atol=1e-6)
  mask = jnp.asarray(np.random.default_rng(0).random((2, 3, 5)) > 0.4)
  y_mask = forward(x, mask)
  y_other = forward(jnp.where(mask[..., None], x, 7.0), mask)
  np.testing.assert_allclose(y_other * mask[..., None], y_mask * mask[..., None], rtol=1e-5, atol=1e-6)
  assert not np.allclose(y_mask, y, atol=1e-4)
  with pytest.raises(ValueError, match="non-causal LightNet cannot decode"):
    layer.apply(variables, x, decode=True)
  with pytest.raises(ValueError, match="causal LightNet reads a 1-D sequence"):
    LightNet(num_heads=HEADS).init(jax.random.key(0), x)


def classifier_config():
  config = models.default_config()
  config.update(models.lightnet_block_config("image"))
  config.update(dict(d_model=WIDTH, num_layers=1, num_classes=2, image_size=(16, 16)))
  config.mixer_kwargs.update(dict(num_heads=HEADS, gate_rank=4))
  config.positional_kwargs.num_heads = HEADS
  return config


def test_classifier_trains_with_decreasing_loss():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 32)
  images = rng.standard_normal((32, 16, 16, 3)).astype(np.float32)
  images[labels == 1, :8] += 1.0  # class 1: brighter top half
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  model = models.build_model(classifier_config())
  opt = optax.adam(1e-2)

  @jax.jit
  def init(key, images):
    params = model.init(key, images)["params"]
    return params, opt.init(params)

  params, opt_state = init(jax.random.key(0), images[:1])
  assert "md_tpe" in params

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, images), labels).mean()

  @jax.jit
  def train_step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  losses = []
  for _ in range(8):
    params, opt_state, loss = train_step(params, opt_state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses
