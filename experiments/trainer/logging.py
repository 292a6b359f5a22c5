"""Where metrics go: a progress bar (terminal) or plain lines (logs), TensorBoard events and metrics.jsonl.

    log = MetricsLog(workdir, total_steps=1000, start_step=step)
    log.write(step, {"train/loss": 0.5, ...})   # every sink
    log.progress(step, "loss=0.50 acc=0.91")      # bar postfix, or one printed line
"""
import json
import os
import sys
import time

import tensorboardX
import tqdm


def read_metrics(workdir):
  """{name: [(step, value), ...]} from `workdir/metrics.jsonl`; a step written twice (after a resume) keeps
  its last value."""
  path = os.path.join(workdir, "metrics.jsonl")
  series = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      row = json.loads(line)
      step = row.pop("step")
      for name, value in row.items():
        series.setdefault(name, {})[step] = value
  return {name: sorted(points.items()) for name, points in series.items()}


class MetricsLog:
  """Scalar metrics of a run, written to TensorBoard (`workdir/tensorboard`) and `workdir/metrics.jsonl`."""

  def __init__(self, workdir, *, total_steps, start_step=0, enabled=True):
    self.enabled = enabled
    self.total_steps = total_steps
    self.bar = None
    self._jsonl = self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._start = (time.time(), start_step)
    if sys.stderr.isatty():
      self.bar = tqdm.tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")

  def write(self, step, scalars):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def progress(self, step, text):
    """Moves the bar to `step` with `text` beside it; without a terminal, logs `step/total text ETA`."""
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix_str(text, refresh=True)
      return
    t0, s0 = self._start
    rate = (step - s0) / max(time.time() - t0, 1e-9)
    eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
    self.message(f"step {step}/{self.total_steps} {text} eta={_duration(eta)}")

  def message(self, text):
    """A line for people: above the bar on a terminal, else to the log and stdout."""
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()


def _duration(seconds):
  if seconds != seconds or seconds == float("inf"):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
