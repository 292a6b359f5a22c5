"""Evaluation of parameters on a split: loss and accuracy over every valid example (or the first batches)."""
import jax
import numpy as np


def evaluate(experiment, eval_step, params, split, *, max_batches=0):
  """{"loss", "accuracy", "count"} over `split` (all of it when max_batches is 0); padding rows count for nothing."""
  totals = None
  it = experiment.batches(split, batch_size=experiment.config.eval_batch_size)
  for i, batch in enumerate(it):
    if max_batches and i >= max_batches:
      break
    sums = eval_step(params, batch)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  count = max(totals["count"], 1.0)
  return {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count, "count": totals["count"]}


def summarize(window):
  """Train metrics of a window of steps: [(step, metric sums)] -> loss, accuracy, grad_norm (means), param_norm (last)."""
  loss_sum = sum(m["loss_sum"] for _, m in window)
  count = max(sum(m["count"] for _, m in window), 1.0)
  return {"loss": float(loss_sum / count), "accuracy": float(sum(m["correct"] for _, m in window) / count),
          "grad_norm": float(np.mean([m["grad_norm"] for _, m in window])),
          "param_norm": float(window[-1][1]["param_norm"])}
