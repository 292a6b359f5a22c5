"""The schema of a training config: its fields, their defaults, and the one check the trainer runs at start-up.

    config = trainer_config.default_config("mqar")   # every field at its default (what configs/*.py start from)
    config, spec = trainer_config.resolve(config)     # complete, checked, read-only; the dataset's DatasetSpec

Fields:
  data              the dataset: `name` and its fields (`experiments.data.data_config`)
  model             `mixers.models.default_config()` fields. kind and causal follow from the dataset's task
                    (language modelling: a causal LM; classification: a bidirectional classifier) unless set;
                    vocab_size, num_classes, image_size and max_len always come from the dataset
  optimizer         `experiments.trainer.optimizer.default_config()` fields
  seed              parameter initialisation and data order
  batch_size        global batch (all hosts together)
  num_steps         train steps (batches)
  log_every         steps between train-metric writes
  eval_every        steps between evaluations (0: only at the end)
  eval_steps        batches per periodic evaluation (0: the whole evaluation split)
  eval_batch_size
  checkpoint_every  steps between checkpoints (and one at the end)
  keep_checkpoints  the newest checkpoints kept
  mesh              device mesh axis sizes, e.g. {"data": -1} (every device on data); every axis of
                    `mixers.sharding.MESH_AXES` is there to override (`--config.mesh.sequence=2`)
  process_axis      the mesh axis along which the processes (hosts) of a multi-host run lie, e.g. "sequence"
                    to split each sequence across hosts; "" (default): jax's placement, processes along data
  plot              write PNG curves into workdir/plots at the end
  resume            False: move the workdir's previous run into workdir/archive/<date-time>/ and start afresh
                    (`experiments.trainer.resume`)
"""
import ml_collections
from ml_collections import config_dict

from experiments import data
from experiments.data import data_config
from experiments.trainer import optimizer as optimizer_lib
from mixers import models
from mixers import sharding

# Top-level scalar fields: (default, smallest valid value).
SCALARS = {"seed": (0, None), "batch_size": (64, 1), "num_steps": (1000, 1), "log_every": (50, 1),
           "eval_every": (500, 0), "eval_steps": (0, 0), "eval_batch_size": (256, 1), "checkpoint_every": (500, 1),
           "keep_checkpoints": (3, 1), "plot": (True, None), "resume": (True, None)}
BOOLEANS = ("plot", "resume")
FIELDS = ("data", "model", "optimizer", "mesh", "process_axis") + tuple(SCALARS)


def model_defaults():
  """`mixers.models.default_config()` with kind and causal unset: they follow from the dataset's task."""
  model = models.default_config()
  model.kind = config_dict.placeholder(str)
  model.causal = config_dict.placeholder(bool)
  return model


def default_config(dataset):
  """A training config of dataset `dataset` with every field at its default (a fresh ConfigDict)."""
  c = ml_collections.ConfigDict()
  c.data = data_config.defaults(dataset)
  c.model = model_defaults()
  c.optimizer = optimizer_lib.default_config()
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1})
  c.process_axis = ""
  for name, (default, _) in SCALARS.items():
    c[name] = default
  return c


def complete(config):
  """`config` completed with the defaults and checked, without reading the dataset (a fresh ConfigDict).

  ValueError on unknown fields (listing the valid ones) and on bad values (naming the field). The model's
  mixers are checked by `resolve`, once kind and causal are known.
  """
  given = _as_dict(config)
  _check_keys("config", given, FIELDS)
  if "data" not in given:
    raise ValueError("config has no 'data' field: expected at least config.data.name")
  data_fields = data_config.resolve(given["data"])
  c = default_config(data_fields.name)
  for name in ("model", "optimizer"):
    _check_keys(f"config.{name}", _as_dict(given.get(name, {})), c[name].keys())
  with c.ignore_type():
    c.update({k: v for k, v in given.items() if k not in ("data", "mesh")})
  c.data = data_fields
  if "mesh" in given:
    c.mesh = ml_collections.ConfigDict(_as_dict(given["mesh"]))
  _check_values(c)
  return c


def resolve(config):
  """(config, spec): `config` completed, checked and read-only, the model fields set from its dataset's spec.

  The trainer's one check of a config, run when a run starts (training, evaluation, generation).
  """
  c = complete(config)
  spec = data.dataset_spec(c.data)
  _set_model_from_dataset(c.model, spec)
  return ml_collections.FrozenConfigDict(c), spec


def _set_model_from_dataset(model, spec):
  """Sets the model fields that follow from the dataset: kind, causal, vocab_size, num_classes, image_size,
  max_len. The one place where a model's causality is decided."""
  lm = spec.task == "lm"
  kind = "lm" if lm else "classifier"
  if model.kind is not None and model.kind != kind:
    raise ValueError(f"config.model.kind={model.kind!r}: dataset {spec.name!r} is a {spec.task} task, "
                     f"which trains kind={kind!r}")
  if lm and model.causal is False:
    raise ValueError(f"config.model.causal=False: dataset {spec.name!r} is language modelling, which is causal")
  with model.ignore_type():
    model.kind = kind
    model.causal = lm if model.causal is None else model.causal
    if not lm:
      model.num_classes = spec.num_classes
    if spec.inputs == "tokens":
      model.vocab_size = spec.vocab_size
      model.max_len = max(model.max_len, spec.seq_len or 0)
      model.patch_size = 0
    else:
      model.image_size = tuple(spec.image_shape[:2])
  if spec.inputs == "image" and not model.patch_size:
    raise ValueError(f"config.model.patch_size=0: dataset {spec.name!r} gives images {spec.image_shape}; set it "
                     "> 0 (or config.data.as_tokens=True to read pixels as tokens)")
  models.check_config(model)


def _check_values(c):
  for name, (_, least) in SCALARS.items():
    kind = bool if name in BOOLEANS else int
    if not isinstance(c[name], kind) or (kind is int and isinstance(c[name], bool)):
      raise ValueError(f"config.{name}={c[name]!r}: expected {'True or False' if kind is bool else 'an integer'}")
    if least is not None and c[name] < least:
      raise ValueError(f"config.{name}={c[name]}: expected >= {least}")
  o = c.optimizer
  for name, low, high in (("learning_rate", 0.0, None), ("warmup_steps", 0, None), ("min_lr_ratio", 0.0, 1.0),
                          ("weight_decay", 0.0, None), ("clip_norm", 0.0, None), ("accumulate_steps", 1, None)):
    if o[name] < low or (high is not None and o[name] > high):
      expected = f"in [{low}, {high}]" if high is not None else f">= {low}"
      raise ValueError(f"config.optimizer.{name}={o[name]}: expected {expected}")
  if not isinstance(o.accumulate_steps, int):
    raise ValueError(f"config.optimizer.accumulate_steps={o.accumulate_steps!r}: expected an integer")
  for name in ("lr_mults", "wd_mults"):
    optimizer_lib.check_mults(name, o[name])
  for axis, size in c.mesh.items():
    if not isinstance(size, int) or isinstance(size, bool):
      raise ValueError(f"config.mesh.{axis}={size!r}: expected an integer (-1: every remaining device)")
  if c.process_axis not in ("",) + sharding.MESH_AXES:
    raise ValueError(f"config.process_axis={c.process_axis!r}: expected '' or one of {list(sharding.MESH_AXES)}")


def _check_keys(where, given, valid):
  unknown = sorted(set(given) - set(valid))
  if unknown:
    raise ValueError(f"{where}: unknown fields {unknown}; valid fields: {', '.join(sorted(valid))}")


def _as_dict(value):
  """A plain (nested) dict of a ConfigDict, FrozenConfigDict or mapping, placeholders read as their values."""
  return value.to_dict() if hasattr(value, "to_dict") else dict(value)
