"""Evaluates a checkpoint of a training run on a split: loss and accuracy, printed as `accuracy=0.97`.

    python -m experiments.evaluate --workdir workdirs/mqar                  # latest checkpoint, eval split
    python -m experiments.evaluate --workdir workdirs/mqar --split test --step 1000
"""
from absl import app
from absl import flags
from absl import logging

from experiments.trainer import evaluation
from experiments.trainer import restore
from experiments.trainer import step as step_lib


def evaluate_run(workdir, *, split=None, step=None, max_batches=0):
  """{"loss", "accuracy", "count", "split", "step"} of checkpoint `step` of the run in `workdir` on `split`."""
  exp, state, step = restore.load_run(workdir, step=step)
  split = split or exp.spec.eval_split
  if split not in exp.spec.splits:
    raise ValueError(f"split={split!r}: the dataset {exp.spec.name!r} has splits {list(exp.spec.splits)}")
  eval_step = step_lib.make_eval_step(exp.model, exp.mesh, exp.shardings["params"], task=exp.task)
  result = evaluation.evaluate(exp, eval_step, state["params"], split, max_batches=max_batches)
  return {**result, "split": split, "step": step}


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  r = evaluate_run(f.workdir, split=f.split, step=f.step, max_batches=f.max_batches)
  print(f"step={r['step']} {r['split']} accuracy={r['accuracy']:.4f} loss={r['loss']:.4f} "
        f"({int(r['count'])} scored targets)", flush=True)


def define_flags():
  """The command-line flags (defined only when run as a program, so that the module imports cleanly)."""
  flags.DEFINE_string("workdir", None, "the training run's workdir")
  flags.DEFINE_string("split", None, "split to evaluate (default: the dataset's evaluation split)")
  flags.DEFINE_integer("step", None, "checkpoint step (default: the latest readable one)")
  flags.DEFINE_integer("max_batches", 0, "evaluate only this many batches (0: the whole split)")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
