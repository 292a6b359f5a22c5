"""What the studies (sweep, lra, scaling) share: a runs.jsonl log of finished runs and a short-run schedule."""
import json
import os

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
