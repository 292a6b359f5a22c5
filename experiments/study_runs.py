"""What the studies (sweep, lra, scaling) share: their common flags, one training run, a runs.jsonl log of
finished runs, a short-run schedule and figure saving."""
import json
import math
import os
import time

from absl import flags
from absl import logging

RUNS = "runs.jsonl"


def read_runs(out):
  """The rows of OUT/runs.jsonl (one finished run each), or [] before the first run."""
  path = os.path.join(out, RUNS)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def append_run(out, row):
  """Appends one finished run to OUT/runs.jsonl, so a rerun of the study skips it."""
  with open(os.path.join(out, RUNS), "a") as f:
    f.write(json.dumps(row) + "\n")


def define_study_flags(study, unit):
  """The flags every study takes: --quick, --out (default results/STUDY[_quick]), --mixers, --plot_only."""
  flags.DEFINE_bool("quick", False, f"run the quick {unit} instead of the full one")
  flags.DEFINE_string("out", None, f"output folder (default results/{study}[_quick])")
  flags.DEFINE_list("mixers", None, f"override the {unit}'s mixers")
  flags.DEFINE_bool("plot_only", False, "only redraw table and figure from OUT/runs.jsonl")


def study_grid(study, quick, full):
  """(grid, out) from the study flags: a copy of `quick` or `full` with --mixers applied, and OUT. Also quiets
  the absl log to warnings unless --verbosity is given (orbax and TFDS log every file at INFO)."""
  values = flags.FLAGS
  if not values["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  grid = dict(quick if values.quick else full)
  if values.mixers:
    grid["mixers"] = tuple(values.mixers)
  return grid, values.out or os.path.join("results", f"{study}_quick" if values.quick else study)


def train_run(config, out, name):
  """Trains `config` in OUT/runs/NAME (resuming it). Returns {"accuracy", "loss", "seconds"} (NaN metrics when
  the loss turned non-finite), or None when SIGTERM stopped the run (it is checkpointed: rerun to resume)."""
  from experiments.trainer import loop  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  start = time.time()
  try:
    result = loop.train_and_evaluate(config, os.path.join(out, "runs", name))
  except loop.NonFiniteLossError:
    result = {"accuracy": math.nan, "loss": math.nan, "preempted": False}
  if result["preempted"]:
    print(f"stopped by SIGTERM during {name}; rerun the same command to resume", flush=True)
    return None
  return {"accuracy": result["accuracy"], "loss": result["loss"], "seconds": round(time.time() - start, 1)}


def save_figure(fig, path):
  """Lays out `fig`, writes it to `path` (creating its folder) at 80 dpi, closes it; returns path."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def short_run_schedule(config, num_steps, learning_rate):
  """A study run: `num_steps` steps, 10% warm-up, no periodic evaluation, one checkpoint at the end."""
  config.num_steps = num_steps
  config.optimizer.learning_rate = learning_rate
  config.optimizer.warmup_steps = max(1, num_steps // 10)
  config.eval_every = 0
  config.checkpoint_every = num_steps
  config.keep_checkpoints = 1
  config.log_every = max(1, num_steps // 4)
  config.plot = False
  return config
