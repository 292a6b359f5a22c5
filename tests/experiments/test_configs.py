"""Configs: every family builds, ARG picks mixer and size, bad names and keys fail listing valid choices."""
import ml_collections
import pytest

import configs
from configs import image, listops, lm, mqar, pathfinder
from experiments.trainer import experiment
from mixers import registry

FAMILIES = {"mqar": mqar, "lm": lm, "listops": listops, "pathfinder": pathfinder, "image": image}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_config_is_complete(name):
  config = FAMILIES[name].get_config()
  configs.check(config)
  assert set(config.keys()) == set(configs.TRAIN_FIELDS)


def test_arg_picks_mixer_and_size():
  config = mqar.get_config("mamba2,base")
  assert (config.model.mixer, config.model.d_model) == ("mamba2", mqar.SIZES["base"][0])
  config = listops.get_config("size=tiny,mixer=gla+attention")
  assert config.model.mixer == "gla,attention" and config.model.d_model == listops.SIZES["tiny"][0]


@pytest.mark.parametrize("module", [mqar, lm])
def test_causal_tasks_refuse_non_causal_mixers(module):
  with pytest.raises(ValueError, match="non-causal") as e:
    module.get_config("hydra")
  for name in registry.names("sequence"):
    assert (name in str(e.value).split("causal mixers:")[1]) == registry.is_causal_capable(name)


def test_unknown_mixer_and_size_list_the_valid_ones():
  with pytest.raises(ValueError, match="valid mixers: .*gla.*mamba2"):
    mqar.get_config("flash")
  with pytest.raises(ValueError, match="valid sizes: tiny, small, base"):
    mqar.get_config("gla,huge")


def test_bad_keys_fail_listing_the_valid_ones():
  config = lm.get_config()
  config.model.widht = 3
  with pytest.raises(ValueError, match=r"unknown model config keys \['widht'\].*d_model"):
    configs.check(config)
  config = lm.get_config()
  config.learning_rate = 1e-3
  with pytest.raises(ValueError, match=r"unknown fields \['learning_rate'\].*batch_size"):
    configs.check(config)
  config = lm.get_config()
  config.optimizer.lr = 1e-3
  with pytest.raises(ValueError, match=r"unknown fields \['lr'\].*learning_rate"):
    experiment.create(config)
  config = lm.get_config()
  config.model.mixer = "flash"
  with pytest.raises(ValueError, match="unknown mixer 'flash'; valid names: .*gla"):
    experiment.create(config)


def test_command_line_style_overrides_are_checked():
  config = mqar.get_config()
  config.data = ml_collections.ConfigDict({**config.data.to_dict(), "pairs": 4})
  with pytest.raises(ValueError, match=r"unknown fields \['pairs'\].*num_pairs"):
    experiment.create(config)
