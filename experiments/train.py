"""Trains any config of `configs/` (language modelling, sequence or image classification).

    python -m experiments.train --config configs/mqar.py --workdir workdirs/mqar
    python -m experiments.train --config configs/mqar.py:mamba2 --workdir DIR --config.num_steps=2000

Every config field overrides on the command line (`--config.model.d_model=256`). Rerunning the same
command resumes from the latest checkpoint in `workdir/checkpoints`; metrics go to
`workdir/metrics.jsonl` and `workdir/tensorboard`, curves to `workdir/plots`.
"""
import os
import sys

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

import jax

from experiments import plots
from experiments.trainer import loop
from mixers import sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file, optionally with :ARG",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory of checkpoints, metrics and plots (resumes from it)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every file they touch at INFO
  sharding.maybe_initialize_distributed()
  config = _CONFIG.value
  try:
    result = loop.train_and_evaluate(config, _WORKDIR.value)
  except loop.NonFiniteLossError as e:
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  if result["preempted"]:
    print(f"stopped at step {result['step']} by SIGTERM; checkpoint: {result['checkpoint']}", flush=True)
    return
  if jax.process_index() == 0:
    if config.plot:
      plots.write_plots(_WORKDIR.value)
    print(f"step={result['step']} {result['split']} accuracy={result['accuracy']:.4f} loss={result['loss']:.4f} "
          f"({int(result['count'])} scored targets)", flush=True)
    workdir = os.path.abspath(_WORKDIR.value)
    print(f"curves: {os.path.join(workdir, 'plots')} (TensorBoard: {os.path.join(workdir, 'tensorboard')}); "
          f"checkpoint: {result['checkpoint']}", flush=True)


if __name__ == "__main__":
  app.run(main)
