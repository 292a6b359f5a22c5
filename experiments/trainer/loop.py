"""The training loop: resume, train, log, evaluate, checkpoint; stop cleanly on SIGTERM or a non-finite loss.

A run holds its workdir's lock (`workdir_lock`) from start to end, so a second trainer there is refused. Before
anything in the workdir changes, the config is held against the run already there (`resume`): a different one
is refused (ConfigMismatchError) unless config.resume is False, which archives that run first; a checkpoint that
does not fit the model is refused too (IncompatibleCheckpointError), while a corrupt one falls back to the
previous one (`checkpoint`).
"""
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
from experiments.trainer import resume as resume_lib
from experiments.trainer import step as step_lib
from experiments.trainer import workdir_lock


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

  Returns {"loss", "accuracy", "count", "split", "step", "checkpoint", "preempted"}. Raises ValueError on a bad
  config (naming the field), WorkdirLockedError when another trainer holds the workdir, ConfigMismatchError or
  IncompatibleCheckpointError when the workdir's run does not fit this config (nothing in it is changed), and
  NonFiniteLossError when the loss turns NaN/inf (checkpoints up to the last good step are kept).
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  lead = jax.process_index() == 0
  existed = os.path.isdir(workdir)
  try:
    with workdir_lock.hold(workdir, enabled=lead), _sigterm_flag() as sigterm, contextlib.ExitStack() as closing:
      return _train(config, workdir, lead, sigterm, closing)
  finally:
    if lead and not existed and os.path.isdir(workdir) and not os.listdir(workdir):
      os.rmdir(workdir)  # refused before writing anything: leave no empty workdir behind


def _open_run(config, workdir, lead, exp):
  """Checks the workdir's run against `config` (archiving it when config.resume is False) before any change."""
  if not config.get("resume", True) and resume_lib.has_run(workdir):
    if lead:
      print(f"config.resume=False: moved the previous run to {resume_lib.archive(workdir)}", flush=True)
    checkpoint_lib.barrier("archived the previous run")
  saved = resume_lib.saved_config(workdir)
  lines = resume_lib.differences(saved, exp.config) if saved is not None else []
  if lines:
    raise resume_lib.ConfigMismatchError(resume_lib.mismatch_message(workdir, lines,
                                                                     _checkpoint_mismatches(workdir, exp.state)))


def _checkpoint_mismatches(workdir, state):
  """Lines naming the arrays of the workdir's latest checkpoint that do not fit `state` (read-only)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  ckpt = checkpoint_lib.Checkpoints(directory, every=1)
  try:
    step = ckpt.latest_step()
    return ckpt.mismatches(step, state) if step is not None else []
  except Exception:  # pylint: disable=broad-except  # unreadable metadata: the field names say enough
    return []
  finally:
    ckpt.close()


def _train(config, workdir, lead, sigterm, closing):
  """The run itself; `closing` (an ExitStack) closes the checkpoints and metrics log however it ends."""
  exp = experiment_lib.create(config)
  _open_run(config, workdir, lead, exp)
  config = exp.config
  ckpt = closing.enter_context(contextlib.closing(checkpoint_lib.Checkpoints(
      os.path.join(workdir, "checkpoints"), every=config.checkpoint_every, keep=config.keep_checkpoints)))
  state, start = ckpt.restore_latest(exp.state, exp.shardings)
  exp.state = None
  if start > config.num_steps:
    raise ValueError(f"config.num_steps={config.num_steps}: the workdir's latest checkpoint is at step {start}, "
                     "past it")
  if lead:
    resume_lib.write_config_once(workdir, config)
    resume_lib.drop_metrics_after(workdir, start)
  log = closing.enter_context(contextlib.closing(
      logging_lib.MetricsLog(workdir, total_steps=config.num_steps, start_step=start, enabled=lead)))
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
        raise NonFiniteLossError(non_finite_message(s, m, start, ckpt))
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

  step = start
  for step in range(start + 1, config.num_steps + 1):
    state, metrics = train_step(state, next(batches))
    window.append((step, metrics))
    # The SIGTERM flag is read after every step, so a preempted run saves within one step of the signal.
    saving = step % config.checkpoint_every == 0 or step == config.num_steps or sigterm["set"]
    if saving or step % config.log_every == 0:
      flush(step)
    if config.eval_every and step % config.eval_every == 0 and step != config.num_steps and not sigterm["set"]:
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

  result = {"loss": float("nan"), "accuracy": float("nan"), "count": 0.0}
  if not preempted:
    result = evaluation.evaluate(exp, eval_step, state["params"], split, max_batches=0)
    if step > start:  # a rerun of a finished run evaluates again but does not write the row twice
      log.write(step, {f"eval/{k}": v for k, v in result.items() if k != "count"})
  return {**result, "split": split, "step": step, "checkpoint": ckpt.path(step), "preempted": preempted}


def non_finite_message(step, metrics, start, ckpt):
  """Why training stopped at `step`: a state that was bad from the start (the loss of step start + 1 is computed
  before any update of this run), or a divergence during training (then the last good checkpoint)."""
  loss = float(metrics["loss_sum"]) / max(float(metrics["count"]), 1.0)
  values = f"{loss}, gradient norm {float(metrics['grad_norm'])}, parameter norm {float(metrics['param_norm'])}"
  if step == start + 1 and not math.isfinite(loss):
    if start:
      return (f"non-finite training loss ({values}) at step {step}, the first step after restoring checkpoint "
              f"{ckpt.path(start)} (step {start}), before any update of this run: the restored state is bad (its "
              "values are finite but give a non-finite loss), not a divergence, and a lower learning rate will not "
              "help. Move that checkpoint away to resume from the one before it.")
    return (f"non-finite training loss ({values}) at step 1, before any update: the freshly initialised model "
            "gives a non-finite loss on this data (the model or the data is at fault, not the learning rate).")
  good = ckpt.latest_step()
  where = f"{ckpt.path(good)} (step {good})" if good is not None else "none (no checkpoint was saved yet)"
  return (f"non-finite training loss ({values}) at step {step}: training stopped. Last good checkpoint: {where}. "
          f"The loss was finite at step {start + 1}, so training diverged: try a lower "
          "config.optimizer.learning_rate, config.optimizer.clip_norm > 0 or float32 compute.")


def _count(params):
  return sum(x.size for x in jax.tree.leaves(params))
