"""The training loop: resume, train, log, evaluate, checkpoint; stop cleanly on SIGTERM or a non-finite loss."""
import contextlib
import math
import os
import signal
import time

import jax

from experiments.trainer import checkpoint as checkpoint_lib
from experiments.trainer import evaluation
from experiments.trainer import experiment as experiment_lib
from experiments.trainer import logging as logging_lib
from experiments.trainer import optimizer as optimizer_lib
from experiments.trainer import step as step_lib


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite; the message says which step and the last good checkpoint."""


@contextlib.contextmanager
def _sigterm_flag():
  """Yields a dict whose "set" turns True when SIGTERM arrives (TPU preemption)."""
  flag = {"set": False}

  def handler(signum, frame):
    del signum, frame
    flag["set"] = True

  try:
    previous = signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread: no handler can be installed
    yield flag
    return
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


def tokens_per_batch(experiment):
  spec, n = experiment.spec, experiment.config.batch_size
  if spec.inputs == "image":
    return n * spec.image_shape[0] * spec.image_shape[1]
  return n * spec.seq_len


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns the final evaluation.

  Returns {"loss", "accuracy", "count", "split", "step", "checkpoint", "preempted"}. Raises
  NonFiniteLossError when the loss turns NaN/inf (checkpoints up to the last good step are kept).
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  exp = experiment_lib.create(config)
  config = exp.config
  lead = jax.process_index() == 0
  if lead:
    experiment_lib.save_config(config, workdir)
  ckpt = checkpoint_lib.Checkpoints(os.path.join(workdir, "checkpoints"), every=config.checkpoint_every,
                                    keep=config.keep_checkpoints)
  state, start = ckpt.restore_latest(exp.state, exp.shardings)
  exp.state = None
  log = logging_lib.MetricsLog(workdir, total_steps=config.num_steps, start_step=start, enabled=lead)
  log.message(f"{config.model.mixer} ({config.model.num_layers} layers, d_model={config.model.d_model}, "
              f"{_count(state['params']):,} parameters) on {config.data.name}; mesh {dict(exp.mesh.shape)}; "
              + (f"resumed from checkpoint step {start}" if start else "starting from scratch")
              + f"; workdir {workdir}")
  train_step = step_lib.make_train_step(exp.model, exp.optimizer, exp.mesh, exp.shardings, task=exp.task)
  eval_step = step_lib.make_eval_step(exp.model, exp.mesh, exp.shardings["params"], task=exp.task)
  schedule = optimizer_lib.learning_rate_schedule(config.optimizer, config.num_steps)
  tokens = tokens_per_batch(exp)
  split = exp.spec.eval_split

  window, last_time, last_step, preempted = [], time.time(), start, False
  batches = exp.batches("train", start_step=start)

  def flush(step):
    nonlocal window, last_time, last_step
    fetched = jax.device_get(window)
    window = []
    for s, m in fetched:
      loss = float(m["loss_sum"]) / max(float(m["count"]), 1.0)
      if not all(math.isfinite(v) for v in (loss, float(m["grad_norm"]), float(m["param_norm"]))):
        good = ckpt.latest_step()
        where = f"{ckpt.path(good)} (step {good})" if good is not None else "none (no checkpoint was saved yet)"
        raise NonFiniteLossError(
            f"non-finite training loss ({loss}, gradient norm {float(m['grad_norm'])}, parameter norm "
            f"{float(m['param_norm'])}) at step {s}: training stopped. Last good checkpoint: {where}. "
            "Try a lower config.optimizer.learning_rate, config.optimizer.clip_norm > 0 or float32 compute.")
    now = time.time()
    steps = step - last_step
    scalars = {f"train/{k}": v for k, v in evaluation.summarize(fetched).items()}
    scalars["train/learning_rate"] = float(schedule(step // config.optimizer.accumulate_steps))
    scalars["train/tokens_per_second"] = steps * tokens / max(now - last_time, 1e-9)
    scalars["train/steps_per_second"] = steps / max(now - last_time, 1e-9)
    log.write(step, scalars)
    log.progress(step, f"loss={scalars['train/loss']:.4f} accuracy={scalars['train/accuracy']:.3f} "
                       f"tokens/s={scalars['train/tokens_per_second']:,.0f}")
    last_time, last_step = now, step

  with _sigterm_flag() as sigterm:
    for step in range(start + 1, config.num_steps + 1):
      state, metrics = train_step(state, next(batches))
      window.append((step, metrics))
      saving = step % config.checkpoint_every == 0 or step == config.num_steps or sigterm["set"]
      if saving or step % config.log_every == 0:
        flush(step)
      if config.eval_every and step % config.eval_every == 0 and step != config.num_steps:
        result = evaluation.evaluate(exp, eval_step, state["params"], split, max_batches=config.eval_steps)
        log.write(step, {f"eval/{k}": v for k, v in result.items() if k != "count"})
        log.message(f"step {step}: eval loss={result['loss']:.4f} accuracy={result['accuracy']:.4f}")
      if sigterm["set"]:
        ckpt.save(step, state)
        log.message(f"SIGTERM: saved checkpoint {ckpt.path(step)}; rerun the same command to resume")
        preempted = True
        break
      if saving:
        ckpt.save(step, state)
    else:
      step = config.num_steps

  result = {"loss": float("nan"), "accuracy": float("nan"), "count": 0.0}
  if not preempted:
    result = evaluation.evaluate(exp, eval_step, state["params"], split, max_batches=0)
    log.write(step, {f"eval/{k}": v for k, v in result.items() if k != "count"})
  ckpt.close()
  log.close()
  return {**result, "split": split, "step": step, "checkpoint": ckpt.path(step), "preempted": preempted}


def _count(params):
  return sum(x.size for x in jax.tree.leaves(params))
