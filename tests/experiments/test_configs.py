"""Configs: every family builds on the trainer's schema, ARG picks mixer and size, the dataset's task decides the
model's kind and causality, bad names, keys and values fail naming the field and the valid choices."""
import ml_collections
import pytest

from configs import image, image_causal, listops, lm, mqar, pathfinder
from experiments.trainer import config as trainer_config
from mixers import registry

FAMILIES = {"mqar": mqar, "lm": lm, "listops": listops, "pathfinder": pathfinder, "image": image,
            "image_causal": image_causal}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_config_is_complete(name):
  config = FAMILIES[name].get_config()
  assert set(config.keys()) == set(trainer_config.FIELDS)
  completed = trainer_config.complete(config)
  for field in ("model", "optimizer"):
    assert completed[field].to_dict() == config[field].to_dict()


def test_arg_picks_mixer_and_size():
  config = mqar.get_config("mamba2,base")
  assert (config.model.mixer, config.model.d_model) == ("mamba2", mqar.SIZES["base"][0])
  config = listops.get_config("size=tiny,mixer=gla+attention")
  assert config.model.mixer == "gla,attention" and config.model.d_model == listops.SIZES["tiny"][0]


@pytest.mark.parametrize("module,kind,causal", [(mqar, "lm", True), (lm, "lm", True),
                                                (listops, "classifier", False), (pathfinder, "classifier", False)])
def test_the_task_decides_kind_and_causality(module, kind, causal):
  config = module.get_config("attention")
  assert config.model.kind is None and config.model.causal is None
  resolved, spec = trainer_config.resolve(config)
  assert (resolved.model.kind, resolved.model.causal) == (kind, causal)
  assert resolved.model.vocab_size == spec.vocab_size
  with pytest.raises(AttributeError):
    resolved.model.causal = not causal  # read-only once checked


def test_a_classifier_may_be_set_causal_and_a_language_model_may_not_be_bidirectional():
  config = listops.get_config("gla")
  config.model.causal = True
  assert trainer_config.resolve(config)[0].model.causal
  config = mqar.get_config("gla")
  config.model.causal = False
  with pytest.raises(ValueError, match="config.model.causal=False: dataset 'mqar' is language modelling"):
    trainer_config.resolve(config)


@pytest.mark.parametrize("module", [mqar, lm])
def test_causal_tasks_refuse_non_causal_mixers(module):
  with pytest.raises(ValueError, match="non-causal") as e:
    trainer_config.resolve(module.get_config("hydra"))
  for name in registry.names("sequence"):
    assert (name in str(e.value).split("causal mixers:")[1]) == registry.is_causal_capable(name)


def test_unknown_mixer_and_size_list_the_valid_ones():
  with pytest.raises(ValueError, match="valid mixers: .*gla.*mamba2"):
    mqar.get_config("flash")
  with pytest.raises(ValueError, match="valid sizes: tiny, small, base"):
    mqar.get_config("gla,huge")


@pytest.mark.parametrize("field,value,message", [
    ("model.widht", 3, r"config.model: unknown fields \['widht'\]; valid fields: .*d_model"),
    ("learning_rate", 1e-3, r"config: unknown fields \['learning_rate'\]; valid fields: .*batch_size"),
    ("optimizer.lr", 1e-3, r"config.optimizer: unknown fields \['lr'\]; valid fields: .*learning_rate"),
    ("num_steps", 0, r"config.num_steps=0: expected >= 1"),
    ("batch_size", 8.5, r"config.batch_size=8.5: expected an integer"),
    ("optimizer.accumulate_steps", 0, r"config.optimizer.accumulate_steps=0: expected >= 1"),
    ("optimizer.min_lr_ratio", 2.0, r"config.optimizer.min_lr_ratio=2.0: expected in \[0.0, 1.0\]"),
])
def test_bad_fields_and_values_are_named(field, value, message):
  config = lm.get_config()
  *parents, name = field.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  with node.ignore_type():
    node[name] = value
  with pytest.raises(ValueError, match=message):
    trainer_config.complete(config)


def test_unknown_mixer_is_named_when_the_run_starts():
  config = lm.get_config()
  config.model.mixer = "flash"
  with pytest.raises(ValueError, match="unknown mixer 'flash'; valid names: .*gla"):
    trainer_config.resolve(config)


def test_command_line_style_overrides_are_checked():
  config = mqar.get_config()
  config.data = ml_collections.ConfigDict({**config.data.to_dict(), "pairs": 4})
  with pytest.raises(ValueError, match=r"unknown fields \['pairs'\].*num_pairs"):
    trainer_config.complete(config)


def test_a_partial_config_takes_the_defaults():
  config = trainer_config.complete({"data": {"name": "mqar", "seq_len": 32}, "model": {"mixer": "retention"}})
  assert (config.data.seq_len, config.data.num_pairs, config.model.mixer) == (32, 4, "retention")
  assert config.optimizer.to_dict() == trainer_config.optimizer_lib.default_config().to_dict()
  assert config.batch_size == trainer_config.SCALARS["batch_size"][0]
