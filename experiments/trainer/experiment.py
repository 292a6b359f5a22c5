"""From a config to the things a run needs: dataset spec, model, mesh, optimizer and sharded train state."""
import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import data
from experiments.trainer import config as config_lib
from experiments.trainer import optimizer as optimizer_lib
from experiments.trainer import step as step_lib
from mixers import models
from mixers import sharding


@dataclasses.dataclass
class Experiment:
  config: ml_collections.FrozenConfigDict
  spec: Any  # data.DatasetSpec
  model: Any
  mesh: Any
  optimizer: Any
  state: Any
  shardings: Any

  @property
  def task(self):
    return self.spec.task

  def batches(self, split, *, start_step=0, batch_size=None):
    """Global batches of `split` as jax.Arrays sharded over the mesh's batch axes; this host reads only the rows
    its devices hold (`mixers.sharding.host_data_shard`)."""
    batch_size = batch_size or self.config.batch_size
    batch_sh = sharding.batch_sharding(self.mesh)
    shard, num_shards = sharding.host_data_shard(batch_sh, batch_size)
    it = data.get_dataset(self.config.data, split, seed=self.config.seed, batch_size=batch_size,
                          process_index=shard, process_count=num_shards, start_step=start_step)
    return (sharding.global_batch(b, batch_sh, batch_size) for b in it)


def example_batch(spec, mesh, packed=False):
  """Zeros shaped like a batch of `spec` (one row per batch shard; with segment ids when `packed`), for
  initialisation."""
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  if spec.inputs == "image":
    return {"image": np.zeros((rows,) + tuple(spec.image_shape), np.uint8)}
  batch = {"inputs": np.zeros((rows, spec.seq_len), np.int32), "mask": np.ones((rows, spec.seq_len), bool)}
  if packed:
    batch["segment_ids"] = np.zeros((rows, spec.seq_len), np.int32)
  return batch


def is_packed(data_config):
  """Whether the dataset packs documents into rows with segment ids (`data.packing`: the byte corpus and the
  catalog LM datasets)."""
  return bool(data.data_config.resolved(data_config).get("packing", False))


def create(config):
  """An Experiment with freshly initialised state (ValueError on a bad config, before any heavy work).

  `config` is checked here, once (`experiments.trainer.config.resolve`); `Experiment.config` is the complete,
  read-only result.
  """
  config, spec = config_lib.resolve(config)
  mesh = sharding.make_mesh(config.mesh.to_dict(), process_axis=config.process_axis or None)
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % rows:
      raise ValueError(f"config.{name}={config[name]}: expected a multiple of the {rows} batch shards of the mesh "
                       f"{dict(mesh.shape)}")
  model = models.build_model(config.model)
  tx = optimizer_lib.make_optimizer(config.optimizer, config.num_steps)
  packed = is_packed(config.data)
  try:
    state, shardings = step_lib.init_train_state(model, tx, mesh, jax.random.key(config.seed),
                                                 example_batch(spec, mesh, packed))
  except ValueError as e:
    if packed and "segment_ids" in str(e):
      raise ValueError(f"{e}. The data packs documents (config.data.packing=True): set what the model lacks (a "
                       f"mixer's setting: --config.model.per_mixer_kwargs.<mixer>.<setting>=...), or train this "
                       f"model on unpacked windows with --config.data.packing=False") from e
    raise
  return Experiment(config, spec, model, mesh, tx, state, shardings)


def save_config(config, workdir):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def load_config(workdir):
  """The config a run in `workdir` was trained with."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"workdir={workdir!r} has no config.json: is it the workdir of a training run?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
