"""Long Range Arena, non-causal: ListOps and Pathfinder accuracy of small models, beside the LRA paper's numbers.

    python -m experiments.lra --quick                  # short ListOps, Pathfinder-32, tiny models, CPU
    python -m experiments.lra                          # LRA's lengths (ListOps 2K, Pathfinder-32: 1024 pixels)
    python -m experiments.lra --plot_only --out results/lra_quick

Token models read ListOps tokens / Pathfinder pixels as a sequence with learned positions (as LRA's
Transformer). LightNet reads Pathfinder as a 2-D grid of 1x1 patches with MD-TPE in front of the backbone
and MD-LRPE inside every layer. Runs append to `OUT/runs.jsonl` (a rerun skips those done); the table goes to
`OUT/lra.md` and `OUT/lra.csv`, the figure to `OUT/lra_accuracy.png`.
"""
import csv
import os
import time

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments.study_runs import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    append_run, define_study_flags, read_runs, save_figure, short_run_schedule, study_grid, train_run)

MIXERS = ("attention", "linear_attention", "hydra", "vssd", "m2", "lightnet")
TASKS = ("listops", "pathfinder")

# Tay et al. 2020 (arXiv 2011.04006), Table 1: test accuracy (%).
LRA_PAPER = {"Transformer": {"listops": 36.37, "pathfinder": 71.40},
             "Performer": {"listops": 18.01, "pathfinder": 77.05},
             "Linear Trans.": {"listops": 16.13, "pathfinder": 75.30}}

FULL = dict(mixers=MIXERS, d_model=128, num_layers=4, batch_size=32, learning_rate=1e-3,
            num_steps={"listops": 5000, "pathfinder": 10000},
            data={"listops": dict(num_train=96_000, num_validation=2_000),
                  "pathfinder": dict(resolution=32, num_train=100_000, num_validation=2_000)})

# Quick: ListOps expressions of 32..128 tokens (depth <= 4), Pathfinder-32 (1024 pixels: the contour
# generator finds no room for its paths at 16x16); 2 layers of width 32.
QUICK = dict(mixers=MIXERS, d_model=32, num_layers=2, batch_size=32, learning_rate=3e-3,
             num_steps={"listops": 150, "pathfinder": 150},
             data={"listops": dict(num_train=2_000, num_validation=256, seq_len=128, min_length=32, max_length=128,
                                   max_depth=4, max_args=5),
                   "pathfinder": dict(resolution=32, num_train=2_000, num_validation=256, num_test=256)})



def define_flags():
  """The command-line flags (defined by the program only, so that importing the module defines none)."""
  define_study_flags("lra", "grid")
  flags.DEFINE_list("tasks", None, "override the tasks (listops, pathfinder)")
  flags.DEFINE_integer("num_steps", None, "override every task's training steps")
  flags.DEFINE_string("data_dir", None, "where the generated datasets are stored")


def make_config(grid, task, mixer, data_dir=None):
  """The `configs/listops.py` / `configs/pathfinder.py` config of one run."""
  from configs import listops, pathfinder  # pylint: disable=g-import-not-at-top
  config = (listops if task == "listops" else pathfinder).get_config(mixer)
  config.data.update(grid["data"][task])
  if data_dir:
    config.data.data_dir = data_dir
  config.model.d_model = grid["d_model"]
  config.model.num_layers = grid["num_layers"]
  if task == "pathfinder" and mixer == "lightnet":
    config.data.as_tokens = False
    config.model.patch_size = 1
    config.model.positional = "md_tpe"
  else:
    config.model.positional = "learned"
  config.batch_size = grid["batch_size"]
  return short_run_schedule(config, grid["num_steps"][task], grid["learning_rate"])



def table_markdown(rows):
  """Markdown table: this repository's runs (accuracy %, length) and the LRA paper's rows for context."""
  acc = {(r["mixer"], r["task"]): r for r in rows}
  mixers = [m for m in MIXERS if any(k[0] == m for k in acc)] + sorted({k[0] for k in acc} - set(MIXERS))
  lines = ["| model | ListOps | Pathfinder | source |", "|---|---|---|---|"]
  for m in mixers:
    cells = []
    for t in TASKS:
      r = acc.get((m, t))
      cells.append(f"{100 * r['accuracy']:.1f} (T={r['seq_len']})" if r else "not run")
    lines.append(f"| {m} | {cells[0]} | {cells[1]} | this repository |")
  for name, v in LRA_PAPER.items():
    lines.append(f"| {name} | {v['listops']:.2f} (T=2K) | {v['pathfinder']:.2f} (T=1K) | Tay et al. 2020 |")
  return "\n".join(lines) + "\n"


def plot_accuracy(rows, path):
  """Grouped bars: accuracy per mixer, one bar per task, chance levels dashed."""
  mixers = [m for m in MIXERS if any(r["mixer"] == m for r in rows)]
  fig, ax = plt.subplots(figsize=(1.2 * max(len(mixers), 2) + 2, 3.4))
  width = 0.38
  for i, (task, chance) in enumerate((("listops", 0.1), ("pathfinder", 0.5))):
    vals = [next((100 * r["accuracy"] for r in rows if (r["mixer"], r["task"]) == (m, task)), 0.0) for m in mixers]
    bars = ax.bar([j + (i - 0.5) * width for j in range(len(mixers))], vals, width, label=task)
    ax.axhline(100 * chance, ls="--", lw=1, color=bars[0].get_facecolor())
  ax.set_xticks(range(len(mixers)), mixers, rotation=20)
  ax.set_ylabel("validation accuracy (%)")
  ax.set_ylim(0, 100)
  ax.legend(fontsize=8)
  return save_figure(fig, path)


def run_grid(grid, out, tasks, data_dir=None):
  """Trains every (task, mixer) not yet in OUT/runs.jsonl; returns all rows."""
  os.makedirs(out, exist_ok=True)
  done = {r["name"] for r in read_runs(out)}
  start = time.time()
  for task in tasks:
    for mixer in grid["mixers"]:
      name = f"{task}_{mixer}"
      if name in done:
        continue
      config = make_config(grid, task, mixer, data_dir)
      result = train_run(config, out, name)
      if result is None:
        return read_runs(out)
      seq_len = config.data.seq_len if task == "listops" else config.data.resolution ** 2
      row = dict(name=name, task=task, mixer=mixer, accuracy=result["accuracy"], loss=result["loss"],
                 seq_len=seq_len, num_steps=config.num_steps, seconds=result["seconds"])
      append_run(out, row)
      print(f"{name}: accuracy={row['accuracy']:.3f} ({row['seconds']} s; {time.time() - start:.0f} s so far)", flush=True)
  return read_runs(out)


def main(argv):
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  grid, out = study_grid("lra", QUICK, FULL)
  if FLAGS.num_steps:
    grid["num_steps"] = {task: FLAGS.num_steps for task in grid["num_steps"]}
  start = time.time()
  rows = read_runs(out) if FLAGS.plot_only else run_grid(grid, out, FLAGS.tasks or TASKS, FLAGS.data_dir)
  table = table_markdown(rows)
  with open(os.path.join(out, "lra.md"), "w") as f:
    f.write(table)
  with open(os.path.join(out, "lra.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["task", "mixer", "seq_len", "num_steps", "accuracy", "loss", "seconds"],
                       extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  figure = plot_accuracy(rows, os.path.join(out, "lra_accuracy.png"))
  print(table)
  print(f"figure: {figure}; wall time {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
