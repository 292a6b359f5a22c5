"""Trains any config of `configs/` (language modelling, sequence or image classification).

    python -m experiments.train --config configs/mqar.py --workdir workdirs/mqar
    python -m experiments.train --config configs/mqar.py:mamba2 --workdir DIR --config.num_steps=2000
    python -m experiments.train --config configs/lm.py --workdir DIR --config.data.name=lm1b   # another dataset

Every config field overrides on the command line (`--config.model.d_model=256`). Rerunning the same
command resumes from the latest checkpoint in `workdir/checkpoints`; metrics go to
`workdir/metrics.jsonl` and `workdir/tensorboard`, curves to `workdir/plots`. A workdir holds one run:
a rerun with a different config is refused (exit status 1, nothing changed) unless `--config.resume=False`,
which moves the previous run into `workdir/archive/<date-time>/` and starts afresh; so is a second trainer
while one runs there. `--config.data.name=OTHER` swaps in that dataset's fields, keeping those both datasets
have and every `--config.data.*` given.

Multi-host: on a TPU pod (or any job whose environment names its processes, e.g. the MIXERS_* variables that
`tpu_scripts/local.sh` sets for N processes on one machine) every host runs this same command; the trainer calls
`jax.distributed.initialize()` first (`mixers.sharding.maybe_initialize_distributed`).

Exit status: 0 when trained (or stopped by SIGTERM after saving a checkpoint), 1 when refused or failed.
"""
import os
import sys

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

import jax

from experiments import plots
from experiments.data import data_config
from experiments.trainer import checkpoint
from experiments.trainer import group
from experiments.trainer import loop
from experiments.trainer import workdir_lock
from mixers import sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file, optionally with :ARG",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory of checkpoints, metrics and plots (resumes from it)")
flags.mark_flags_as_required(["config", "workdir"])

# Errors that stop a run with a message and exit status 1 rather than a traceback: bad configs (ValueError,
# which includes a config or checkpoint that does not fit the workdir's run), a workdir held by another
# trainer, a checkpoint that cannot be read, a non-finite loss, and (on the other processes of a multi-host run)
# any of these on process 0 at a step that they wait for.
REFUSALS = (ValueError, workdir_lock.WorkdirLockedError, checkpoint.CheckpointRestoreError, loop.NonFiniteLossError,
            group.LeadProcessError)


def switch_dataset(config, overrides):
  """`config` with `config.data` made for the dataset named by an overridden `data.name`.

  overrides: the flat {field path: value} given on the command line. The new dataset's defaults take the
  config file's values of the fields both datasets have, and every `data.*` override (one the new dataset
  lacks is kept, so that it is reported as an unknown field).
  """
  name = overrides.get("data.name")
  if name is None:
    return config
  given = {path.split(".", 1)[1] for path in overrides if path.startswith("data.")}
  data = data_config.defaults(name)
  with data.ignore_type():
    for key, value in config.data.items():
      if key in data or key in given:
        data[key] = value
  with config.unlocked():
    config.data = data
  return config


def run(config, workdir):
  """Trains `config` in `workdir` and prints the result; returns the exit status (module docstring)."""
  try:
    result = loop.train_and_evaluate(config, workdir)
  except REFUSALS as e:
    logging.info("the run stopped on this error", exc_info=True)  # the traceback, with --verbosity=0
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    return 1
  if result["preempted"]:
    print(f"stopped at step {result['step']} by SIGTERM; checkpoint: {result['checkpoint']}", flush=True)
    return 0
  if jax.process_index() == 0:
    if config.plot:
      plots.write_plots(workdir)
    print(f"step={result['step']} {result['split']} accuracy={result['accuracy']:.4f} loss={result['loss']:.4f} "
          f"({int(result['count'])} scored targets)", flush=True)
    workdir = os.path.abspath(workdir)
    print(f"curves: {os.path.join(workdir, 'plots')} (TensorBoard: {os.path.join(workdir, 'tensorboard')}); "
          f"checkpoint: {result['checkpoint']}", flush=True)
  return 0


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every file they touch at INFO
  sharding.maybe_initialize_distributed()
  try:
    config = switch_dataset(_CONFIG.value, config_flags.get_override_values(flags.FLAGS["config"]))
  except ValueError as e:
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  sys.exit(run(config, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main)
