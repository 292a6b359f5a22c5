"""Image configs: ARG picks pool and dataset; the causal grid covers every causal mixer and each of its configs
builds a causal classifier with the class token after the patches."""
import jax
import jax.numpy as jnp
import pytest

from configs import image, image_causal
from experiments.trainer import config as trainer_config
from mixers import models
from mixers import registry


def test_arg_picks_pool_and_dataset():
  config = image.get_config("hydra,tiny,pool=cls,data=pathfinder")
  assert (config.model.mixer, config.model.pool, config.data.name) == ("hydra", "cls", "pathfinder")
  assert config.model.d_model == image.SIZES["tiny"][0]
  assert (image.get_config().model.pool, image.get_config().data.name) == ("mean", "cifar10")
  config = image_causal.get_config("gla+attention,pool=mean")
  assert (config.model.mixer, config.model.pool, config.model.causal) == ("gla,attention", "mean", True)


@pytest.mark.parametrize("arg,message", [
    ("gla,pool=max", r"unknown pool 'max'; valid pools: mean, cls, last_token"),
    ("gla,data=imagenet", r"unknown image dataset 'imagenet'; valid datasets: pathfinder, cifar10"),
    ("gla,patch=2", r"unknown key 'patch'; valid keys: mixer, size, pool, data"),
    ("flash", r"unknown mixer 'flash'; valid mixers: .*gla"),
])
def test_bad_arguments_are_named(arg, message):
  with pytest.raises(ValueError, match=message):
    image_causal.get_config(arg)


def test_the_causal_grid_is_every_causal_mixer():
  names = image_causal.mixers()
  assert names == [n for n in registry.names("sequence") if registry.is_causal_capable(n)]
  assert {"attention", "gla", "mamba2", "lightnet"} <= set(names) and "hydra" not in names


@pytest.mark.parametrize("mixer", image_causal.mixers())
def test_every_causal_config_builds_a_causal_class_token_classifier(mixer):
  """On the locally generated Pathfinder-32: resolved causal, pool last_token, learned positions; the model traces
  on a batch of images (64 patches and the class token)."""
  config, spec = trainer_config.resolve(image_causal.get_config(f"{mixer},tiny,data=pathfinder"))
  assert (config.model.kind, config.model.causal, config.model.pool) == ("classifier", True, "last_token")
  assert config.model.positional == "learned" and spec.image_shape == (32, 32, 1)
  model = models.build_model(config.model)
  images = jnp.zeros((2,) + spec.image_shape, jnp.uint8)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  logits = jax.eval_shape(model.apply, variables, images)
  assert logits.shape == (2, spec.num_classes)
