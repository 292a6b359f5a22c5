"""Classifier pools: the post-sequence class token ("last_token") lets a causal backbone read the whole input."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixers import models
from mixers.models import classifier
from mixers.models.backbone import SequenceModel
from tests.conftest import assert_close

CAUSAL = ("gla", "mamba2", "attention")


def image_config(mixer, pool, causal=True, positional=""):
  """A one-layer classifier of 8x8 images on 2x2 patches (16 patches)."""
  c = models.default_config()
  c.update(dict(kind="classifier", causal=causal, mixer=mixer, d_model=16, num_layers=1, num_classes=3,
                patch_size=2, image_size=(8, 8), pool=pool, positional=positional))
  c.mixer_kwargs.num_heads = 2
  return c


def token_config(mixer, causal, **mixer_kwargs):
  c = models.default_config()
  c.update(dict(kind="classifier", causal=causal, mixer=mixer, d_model=16, num_layers=2, num_classes=3,
                vocab_size=20, pool="last_token", positional="learned"))
  c.mixer_kwargs.update(dict(num_heads=2, **mixer_kwargs))
  return c


def random_params(model, inputs, seed=2):
  """Parameters drawn at random (N(0, 0.3^2)): at init some output projections are zero, which would hide mixing.
  Drawn by numpy in the shapes of the init's (traced, never compiled): a jax draw compiles per parameter."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(1), inputs)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(0.3 * rng.standard_normal(p.shape), p.dtype), shapes)


def logits_and_grads(model, params, images):
  """(logits, d sum(logits) / d params, |d sum(logits) / d patch| `[B,16]` over the 2x2 patches of 8x8 images).
  Traceable (call it under jit)."""
  def total(p, im):
    logits = model.apply({"params": p}, im)
    return logits.sum(), logits

  (_, logits), (grads, g) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(params, images)
  return logits, grads, patch_influence(g)


def patch_influence(g):
  """|g| `[B,16]` over the 2x2 patches of the gradient g `[B,8,8,1]` of 8x8 images."""
  return jnp.sqrt((g.reshape(-1, 4, 2, 4, 2, 1) ** 2).sum(axis=(2, 4, 5))).reshape(-1, 16)


@pytest.mark.parametrize("mixer", CAUSAL)
def test_causal_class_token_reads_every_patch_and_a_prepended_one_none(mixer):
  """Shapes, jit and grad (finite, reaching the class token); with a causal backbone the class token after the
  patches depends on every patch, the one before them ("cls") on none."""
  images = np.random.default_rng(0).random((2, 8, 8, 1), dtype=np.float32)
  model = models.build_model(image_config(mixer, "last_token"))
  prepended = models.build_model(image_config(mixer, "cls"))

  params, params_cls = random_params(model, images), random_params(prepended, images)

  @jax.jit
  def both(params, params_cls, images):  # one program: both models' logits and gradients
    logits, grads, influence = logits_and_grads(model, params, images)
    g_cls = jax.grad(lambda im: prepended.apply({"params": params_cls}, im).sum())(images)  # images only
    return logits, grads, influence, patch_influence(g_cls)

  logits, grads, influence, influence_cls = both(params, params_cls, images)
  assert params["cls"].shape == (16,)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  assert all(bool(np.all(np.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(np.abs(grads["cls"]).max()) > 0
  assert float(influence.min()) > 0, f"{mixer}: the class token misses some patch: {influence}"
  assert float(influence_cls.max()) == 0.0, (
      f"{mixer}: a causal class token before the patches sees them: {influence_cls}")


@pytest.mark.parametrize("mixer,causal,kwargs", [("gla", True, {"short_conv": True}), ("attention", True, {}),
                                                 ("hydra", False, {})])
def test_padding_changes_nothing(mixer, causal, kwargs):
  """Right-padded rows (garbage in the pads) give the logits of the unpadded rows alone. The class token goes right
  after each row's last real token, so short convolutions and positions around it see the same neighbours with and
  without padding."""
  model = models.build_model(token_config(mixer, causal, **kwargs))
  t, length = 13, 7
  tokens = np.random.default_rng(0).integers(1, 20, (2, t), dtype=np.int32)
  mask = np.arange(t)[None, :] < np.array([[t], [length]])

  params = random_params(model, tokens)

  @jax.jit
  def padded_and_alone(params, tokens, mask):  # one program: both forwards
    padded = model.apply({"params": params}, tokens.at[1, length:].set(19), mask=mask)
    return padded, model.apply({"params": params}, tokens[1:, :length])

  padded, alone = padded_and_alone(params, tokens, mask)
  assert_close(padded[1], alone[0], 1e-5, f"{mixer} padded vs alone")


def test_insert_after_last_against_a_loop():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 5, 3)).astype(np.float32)
  token = rng.normal(size=(4, 1, 3)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 0]], bool)
  insert = jax.jit(classifier.insert_after_last)
  out, out_mask, at = insert(jnp.asarray(x), jnp.asarray(token), jnp.asarray(mask))
  for b in range(4):
    real = np.flatnonzero(mask[b])
    k = real[-1] + 1 if real.size else 0
    assert int(at[b]) == k
    np.testing.assert_array_equal(out[b], np.concatenate([x[b, :k], token[b], x[b, k:]]))
    np.testing.assert_array_equal(out_mask[b], np.concatenate([mask[b, :k], [True], mask[b, k:]]))
  out, out_mask, at = insert(jnp.asarray(x), jnp.asarray(token))
  assert out_mask is None and np.all(np.asarray(at) == 5)
  np.testing.assert_array_equal(out, np.concatenate([x, token], axis=1))
  with pytest.raises(ValueError, match=r"mask must have shape \[B,T\] = \(4, 5\), got \(4, 6\)"):
    classifier.insert_after_last(jnp.asarray(x), jnp.asarray(token), jnp.ones((4, 6), bool))
  with pytest.raises(ValueError, match=r"token must have shape \[B,1,d\] = \(4, 1, 3\), got \(1, 1, 3\)"):
    classifier.insert_after_last(jnp.asarray(x), jnp.asarray(token[:1]))


@pytest.mark.parametrize("positional", ["learned", "md_tpe"])
def test_positions_apply_to_the_patches_only(positional):
  """The backbone receives the class token exactly as learned (no position added) after the 16 patches."""
  model = models.build_model(image_config("gla", "last_token", positional=positional))
  images = np.random.default_rng(0).random((2, 8, 8, 1), dtype=np.float32)
  seen = []

  def skip_backbone(next_fun, args, kwargs, context):
    if isinstance(context.module, SequenceModel):
      seen.append(args[0])
      return args[0]
    return next_fun(*args, **kwargs)

  params = {**random_params(model, images), "cls": np.arange(16, dtype=np.float32)}

  @jax.jit
  def backbone_input(params, images):
    with nn.intercept_methods(skip_backbone):
      model.apply({"params": params}, images)
    return seen[-1]

  x = backbone_input(params, images)
  assert x.shape == (2, 17, 16)
  np.testing.assert_array_equal(x[:, 16], np.broadcast_to(np.arange(16.0), (2, 16)))


def test_unknown_pool_lists_the_valid_ones():
  model = models.build_model(image_config("gla", "max"))
  with pytest.raises(ValueError, match=r"pool must be one of \('mean', 'cls', 'last_token'\), got 'max'"):
    model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def counting_images(key, n):
  """8x8 grey images of noise with 0..3 bright 2x2 squares on distinct cells of the 2x2-patch grid; label: how many
  squares (4 classes). No prefix of the patches tells the count: a reader must see the whole image."""
  k_noise, k_label, k_cells = jax.random.split(key, 3)
  labels = jax.random.randint(k_label, (n,), 0, 4)
  order = jnp.argsort(jax.random.uniform(k_cells, (n, 16)), axis=1)  # a random order of the 16 cells
  bright = (jnp.argsort(order, axis=1) < labels[:, None]).astype(jnp.float32)  # the first `label` cells in it
  squares = jnp.repeat(jnp.repeat(bright.reshape(n, 4, 4), 2, axis=1), 2, axis=2)
  images = 0.3 * jax.random.uniform(k_noise, (n, 8, 8)) + squares
  return images[..., None], labels


def test_causal_class_token_classifier_trains():
  """A causal GLA counts the bright squares of the whole image through the class token after the patches: the
  first step already trains the backbone (the token does not start at zero), the loss falls and held-out accuracy
  is far above chance (1/4)."""
  c = image_config("gla", "last_token", positional="learned")
  c.num_classes = 4
  model = models.build_model(c)
  train_images, train_labels = counting_images(jax.random.key(0), 512)
  test_images, test_labels = counting_images(jax.random.key(1), 256)
  opt = optax.adam(1e-2)

  @jax.jit
  def init(key, images):
    params = nn.unbox(model.init(key, images)["params"])
    return params, opt.init(params)

  params, state = init(jax.random.key(2), train_images[:1])
  batches = np.asarray(train_images).reshape(16, 32, 8, 8, 1), np.asarray(train_labels).reshape(16, 32)

  def loss_fn(p, images, labels):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, images), labels).mean()

  @jax.jit
  def train_step(params, state, images, labels):
    loss, g = jax.value_and_grad(loss_fn)(params, images, labels)
    updates, state = opt.update(g, state)
    return optax.apply_updates(params, updates), state, loss, optax.global_norm(g["backbone"])

  losses = []
  for step in range(80):
    params, state, loss, backbone_grad = train_step(params, state, batches[0][step % 16], batches[1][step % 16])
    assert step or float(backbone_grad) > 0, "the first step does not reach the backbone"
    losses.append(float(loss))
  accuracy = float((jax.jit(model.apply)({"params": params}, test_images).argmax(-1) == test_labels).mean())
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
  assert accuracy > 0.6, accuracy
