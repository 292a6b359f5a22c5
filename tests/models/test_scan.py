"""Scanned layers: the scanned backbone equals the unscanned one with the same (restacked) parameters, forward,
gradient and decoding; its parameters carry the `layers` logical axis."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from mixers import models
from tests.conftest import assert_close, random_variables

NUM_LAYERS, PERIOD = 4, 2  # gla, attention, gla, attention: two groups of two blocks


def config(**overrides):
  c = models.default_config()
  c.update(dict(mixer="gla,attention", d_model=16, num_layers=NUM_LAYERS, vocab_size=20, channel_mixer="mlp",
                **overrides))
  c.mixer_kwargs.num_heads = 2
  return c


@pytest.fixture(scope="module")
def pair():
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 20)
  plain = models.build_model(config())
  scanned = models.build_model(config(scan_layers=True, remat=True, remat_policy="dots_saveable"))
  boxed = jax.eval_shape(scanned.init, jax.random.key(1), tokens)["params"]  # names and shapes only
  params = nn.unbox(random_variables(plain, tokens)["params"])
  stacked = {**params, "backbone": models.stack_layers(params["backbone"], NUM_LAYERS, PERIOD)}
  return plain, scanned, params, stacked, boxed, tokens


def test_scanned_parameters_stack_on_a_layers_axis(pair):
  _, _, params, stacked, boxed, _ = pair
  kernel = boxed["backbone"]["layers"]["block_1"]["mixer"]["query"]["kernel"]
  assert kernel.names == ("layers", "embed", "heads", "kv") and kernel.value.shape == (2, 16, 2, 8)
  assert jax.tree.structure(nn.unbox(boxed)) == jax.tree.structure(stacked)
  restored = models.unstack_layers(stacked["backbone"], PERIOD)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, restored, params["backbone"]))


def test_scanned_equals_unscanned_forward_grad_and_decode(pair):
  plain, scanned, params, stacked, _, tokens = pair
  def logits_and_grad(model, p):  # one program per model: the forward and the gradient of a loss on it
    def loss(p):
      logits = model.apply({"params": p}, tokens)
      return jnp.sum(logits ** 2), logits
    (_, logits), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(p)
    return logits, grad

  logits, g_plain = logits_and_grad(plain, params)
  logits_scanned, g_scanned = logits_and_grad(scanned, stacked)
  assert_close(logits_scanned, logits, 1e-5, "scanned forward")
  assert_close(models.unstack_layers(g_scanned["backbone"], PERIOD)["block_2"]["mixer"]["gate_down"]["kernel"],
               g_plain["backbone"]["block_2"]["mixer"]["gate_down"]["kernel"], 1e-4, "scanned gradient")
  cache = jax.jit(lambda t: scanned.init(jax.random.key(1), t, decode=True))(tokens)["cache"]
  step = jax.jit(lambda c, t: scanned.apply({"params": stacked, "cache": c}, t, decode=True, mutable=["cache"]))
  outs = []
  for t in range(tokens.shape[1]):
    out, state = step(cache, tokens[:, t:t + 1])
    cache = state["cache"]
    outs.append(out)
  assert_close(jnp.concatenate(outs, axis=1), logits, 1e-5, "scanned decode")


def test_bad_remat_policy_lists_the_valid_ones():
  with pytest.raises(ValueError, match="remat_policy must be one of nothing_saveable"):
    models.build_model(config(remat=True, remat_policy="some"))
