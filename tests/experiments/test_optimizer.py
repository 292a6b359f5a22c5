"""The trainer's optimizer: AdamW by default, per-parameter learning-rate and weight-decay multipliers by path."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import lm
from experiments.trainer import config as trainer_config
from experiments.trainer import optimizer as optimizer_lib

PARAMS = {"params": {"mixer": {"filter": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.full((2,), 2.0)},
                                "out": {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.full((2,), 3.0)}}}}


def _config(**fields):
  config = optimizer_lib.default_config()
  config.update(dict(learning_rate=0.1, warmup_steps=0, min_lr_ratio=1.0, clip_norm=0.0, **fields))
  return config


def _updates(config, grads, steps=2):
  tx = optimizer_lib.make_optimizer(config, num_steps=10)
  state, params = tx.init(PARAMS), PARAMS
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return jax.tree.map(lambda new, old: np.asarray(new - old), params, PARAMS)


def _grads(seed=0):
  leaves, tree = jax.tree.flatten(PARAMS)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_defaults_are_adamw_with_decay_on_matrices_only():
  config = _config()
  grads = _grads()
  ref = optax.adamw(0.1, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
                    mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
  state, params = ref.init(PARAMS), PARAMS
  for _ in range(2):
    updates, state = ref.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  expected = jax.tree.map(lambda new, old: np.asarray(new - old), params, PARAMS)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4), _updates(config, grads), expected)


def test_lr_mults_scale_the_matched_parameters_updates_only():
  grads = _grads(1)  # one step: the decay term then sees the same parameters in both runs
  plain = _updates(_config(), grads, steps=1)
  scaled = _updates(_config(lr_mults=(("filter", 0.1), ("out/bias", 0.0))), grads, steps=1)
  filt, out = scaled["params"]["mixer"]["filter"], scaled["params"]["mixer"]["out"]
  np.testing.assert_allclose(filt["kernel"], 0.1 * plain["params"]["mixer"]["filter"]["kernel"], rtol=1e-4)
  np.testing.assert_allclose(filt["bias"], 0.1 * plain["params"]["mixer"]["filter"]["bias"], rtol=1e-4)
  np.testing.assert_array_equal(out["bias"], 0.0)
  np.testing.assert_array_equal(out["kernel"], plain["params"]["mixer"]["out"]["kernel"])


def test_wd_mults_override_the_default_decay_mask():
  zero = jax.tree.map(jnp.zeros_like, PARAMS)  # no gradient: the update is the decay alone, -lr * wd * mult * p
  config = _config(weight_decay=0.5, wd_mults=(("filter/kernel", 0.0), ("bias", 2.0)))
  got = _updates(config, zero, steps=1)["params"]["mixer"]
  np.testing.assert_array_equal(got["filter"]["kernel"], 0.0)
  np.testing.assert_allclose(got["filter"]["bias"], -0.1 * 0.5 * 2.0 * 2.0, rtol=1e-4)
  np.testing.assert_allclose(got["out"]["bias"], -0.1 * 0.5 * 2.0 * 3.0, rtol=1e-4)
  np.testing.assert_allclose(got["out"]["kernel"], -0.1 * 0.5 * 1.0 * 3.0, rtol=1e-4)


def test_a_pattern_that_matches_nothing_is_named():
  with pytest.raises(ValueError, match=r"lr_mults: pattern 'fliter' matches no parameter.*params/mixer"):
    _updates(_config(lr_mults=(("fliter", 0.1),)), _grads())


@pytest.mark.parametrize("value,message", [
    ((("filter", -1.0),), r"config.optimizer.wd_mults: expected \(\(regex, multiplier >= 0\), ...\)"),
    ((("(", 1.0),), r"config.optimizer.wd_mults: bad regex '\('"),
    (("filter",), r"config.optimizer.wd_mults: expected"),
])
def test_bad_multipliers_are_named_when_the_config_is_checked(value, message):
  config = lm.get_config()
  config.optimizer.wd_mults = value
  with pytest.raises(ValueError, match=message):
    trainer_config.complete(config)
