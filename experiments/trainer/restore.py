"""A trained run back in memory: its config, experiment (model, mesh, ...) and restored parameters."""
import os

from experiments.trainer import checkpoint as checkpoint_lib
from experiments.trainer import experiment as experiment_lib


def load_run(workdir, *, step=None):
  """(experiment, restored train state, step) of the run in `workdir` (its latest checkpoint by default), with
  the config the trainer wrote to `workdir/config.json`.

  A corrupt checkpoint is skipped with a warning (not moved: a trainer may be running there); one that does not
  fit the model raises IncompatibleCheckpointError.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  exp = experiment_lib.create(experiment_lib.load_config(workdir))
  ckpt = checkpoint_lib.Checkpoints(os.path.join(workdir, "checkpoints"), every=1, keep=exp.config.keep_checkpoints)
  if step is None:
    state, step = ckpt.restore_latest(exp.state, exp.shardings, move_aside=False)  # reading changes nothing
    if step == 0:
      raise ValueError(f"workdir={workdir!r} has no readable checkpoint in {ckpt.directory}")
  else:
    if step not in ckpt.steps():
      raise ValueError(f"step={step}: no such checkpoint in {ckpt.directory}; saved steps: {ckpt.steps()}")
    state = ckpt.restore(step, exp.state, exp.shardings)
  ckpt.close()
  exp.state = None
  return exp, state, step
