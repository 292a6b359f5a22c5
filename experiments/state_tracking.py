"""State-tracking study: which mixers carry a group state (parity, S3, S5) through a word, over seeds.

    python -m experiments.state_tracking --quick        # parity and S3, T=64, 2 seeds; ~30 min on 2 CPU cores
    python -m experiments.state_tracking                # + S5, 3 seeds, longer training
    python -m experiments.state_tracking --plot_only --out results/state_tracking_quick

Rows are mixer variants: the delta rule with beta in (0, 1) (eigenvalues of I - beta k k^T in [0, 1)) and in
(0, 2) (`allow_neg_eigval`: in (-1, 1)), Gated DeltaNet, and the diagonal-gate recurrences (GLA, Mamba2) whose
transitions have eigenvalues in [0, 1]; softmax attention for reference. Parity needs a negative eigenvalue
(Grazzi et al. 2024), S_n for n >= 3 a non-diagonal transition. Each run appends to OUT/runs.jsonl (a rerun skips
finished runs); the table (mean and spread over seeds of the validation accuracy over every position) goes to
OUT/state_tracking.csv.
"""
import csv
import os
import statistics
import time

from absl import app
from absl import flags

from experiments.study_runs import append_run, define_study_flags, read_runs, short_run_schedule, study_grid, train_run

# variant -> (registered mixer, kwargs laid over configs/state_tracking.py's MIXER_KWARGS)
VARIANTS = {
    "delta_net[0,1]": ("delta_net", dict(allow_neg_eigval=False)),
    "delta_net[-1,1]": ("delta_net", dict(allow_neg_eigval=True)),
    "gated_delta_net[-1,1]": ("gated_delta_net", dict(allow_neg_eigval=True)),
    "gla": ("gla", {}),
    "mamba2": ("mamba2", {}),
    "attention": ("attention", {}),
}

QUICK = dict(mixers=tuple(VARIANTS), groups=("parity", "s3"), seeds=(0, 1), seq_len=64, size="tiny",
             num_steps=600, learning_rate=3e-3)
FULL = dict(mixers=tuple(VARIANTS), groups=("parity", "s3", "s5"), seeds=(0, 1, 2), seq_len=64, size="small",
            num_steps=3000, learning_rate=3e-3)


def define_flags():
  define_study_flags("state_tracking", "grid")
  flags.DEFINE_list("groups", None, "override the grid's groups (parity, s3, s5)")
  flags.DEFINE_integer("num_steps", None, "override the grid's training steps")
  flags.DEFINE_string("data_dir", None, "where the generated datasets are stored")


def make_config(grid, variant, group, seed, data_dir=None):
  """The `configs/state_tracking.py` config of one run."""
  from configs import state_tracking  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
  mixer, overrides = VARIANTS[variant]
  config = state_tracking.get_config(f"{mixer},{grid['size']}")
  config.model.per_mixer_kwargs[mixer] = {**dict(config.model.per_mixer_kwargs.get(mixer, {})), **overrides}
  config.data.update(group=group, seq_len=grid["seq_len"])
  if data_dir:
    config.data.data_dir = data_dir
  config.seed = seed
  return short_run_schedule(config, grid["num_steps"], grid["learning_rate"])


def run_name(variant, group, seed):
  return f"{variant.replace('[', '_').replace(']', '').replace(',', '_')}_{group}_seed{seed}"


def summarize(rows, grid):
  """[(variant, group, mean, spread (max - min), accuracies)] over the seeds run so far, in grid order."""
  out = []
  for variant in grid["mixers"]:
    for group in grid["groups"]:
      accs = [r["accuracy"] for r in rows if (r["variant"], r["group"]) == (variant, group)]
      accs = [a if a == a else 0.0 for a in accs]  # a run whose loss diverged scores 0
      if accs:
        out.append((variant, group, statistics.fmean(accs), max(accs) - min(accs), accs))
  return out


def write_table(summary, out):
  path = os.path.join(out, "state_tracking.csv")
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["variant", "group", "mean_accuracy", "spread", "seeds"])
    for variant, group, mean, spread, accs in summary:
      w.writerow([variant, group, f"{mean:.4f}", f"{spread:.4f}", " ".join(f"{a:.4f}" for a in accs)])
  return path


def run_grid(grid, out, data_dir=None):
  os.makedirs(out, exist_ok=True)
  done = {r["name"] for r in read_runs(out)}
  todo = [(v, g, s) for v in grid["mixers"] for g in grid["groups"] for s in grid["seeds"]
          if run_name(v, g, s) not in done]
  start = time.time()
  for i, (variant, group, seed) in enumerate(todo):
    name = run_name(variant, group, seed)
    result = train_run(make_config(grid, variant, group, seed, data_dir), out, name)
    if result is None:
      break
    append_run(out, dict(name=name, variant=variant, group=group, seed=seed, num_steps=grid["num_steps"], **result))
    print(f"[{i + 1}/{len(todo)}] {name}: accuracy={result['accuracy']:.3f} ({result['seconds']} s; "
          f"{time.time() - start:.0f} s so far)", flush=True)
  return read_runs(out)


def main(argv):
  del argv
  values = flags.FLAGS
  grid, out = study_grid("state_tracking", QUICK, FULL)
  if values.groups:
    grid["groups"] = tuple(values.groups)
  if values.num_steps:
    grid["num_steps"] = values.num_steps
  rows = read_runs(out) if values.plot_only else run_grid(grid, out, values.data_dir)
  summary = summarize(rows, grid)
  table = write_table(summary, out)
  print(f"{'variant':24s} {'group':7s} {'mean':>6s} {'spread':>6s}  seeds   (T={grid['seq_len']}, "
        f"{grid['num_steps']} steps, size {grid['size']})")
  for variant, group, mean, spread, accs in summary:
    print(f"{variant:24s} {group:7s} {mean:6.3f} {spread:6.3f}  {' '.join(f'{a:.3f}' for a in accs)}")
  print(f"table: {table}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
