"""MQAR study (Zoology, arXiv 2312.04927): recall accuracy versus model width, one line per mixer.

    python -m experiments.sweep --quick                 # small grid, 108 runs: 48 minutes on 2 CPU cores
    python -m experiments.sweep --extended              # Zoology's trend on a CPU: (T, pairs) up to (256, 16)
    python -m experiments.sweep                         # the full grid (T=256, 16..64 pairs): a bigger machine
    python -m experiments.sweep --plot_only --out results/mqar_sweep_quick

Each point (mixer, d_model, seq_len, num_pairs) is trained once per learning rate and seed; each seed scores its
best validation accuracy over the learning rates, as in Zoology, and the table gives the mean over the seeds and
their spread (max - min). Every run appends a row to `OUT/runs.jsonl` (a rerun skips the rows already there), the
table goes to `OUT/mqar.csv` and `OUT/mqar.json`, the figure (means, bars from the worst to the best seed) to
`OUT/mqar_accuracy_vs_width.png`.
"""
import csv
import json
import os
import time

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments.study_runs import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    append_run, define_study_flags, read_runs, save_figure, study_grid, train_run)

MIXERS = ("attention", "linear_attention", "retention", "gla", "mamba2", "delta_net", "gated_delta_net", "m2",
          "lightnet")

# Full grid: Zoology's MQAR setting at T=256 (vocabulary 8192, 16..64 pairs, widths 32..256, a log-spaced
# learning-rate sweep, token 0 between the queries as in its Figure 2), with 2 layers for every mixer (Zoology's Figure 2
# config: 2 for attention and 4 for the others, 2 for all since its last revision).
FULL = dict(mixers=MIXERS, d_models=(32, 64, 128, 256), seq_lens=(256,), num_pairs=(16, 32, 64),
            learning_rates=(1e-4, 4.6e-4, 2.2e-3, 1e-2), seeds=(0, 1, 2), vocab_size=8192, num_train=100_000,
            num_validation=3_000, batch_size=64, num_steps=20_000, warmup_steps=500, random_non_queries=False)

# Quick grid: 108 runs of 700 steps (about 30 s each on 2 idle CPU cores): every causal mixer, widths 32 and 64,
# two learning rates, three seeds, short sequences (T=32, 4 pairs) on which attention's recall forms within a few
# hundred steps; uniform noise between the queries (the harder filler, docs/RESULTS.md section 2). `--mixers`,
# `--seeds` and `--d_models` cut it down.
QUICK = dict(mixers=MIXERS, d_models=(32, 64), seq_lens=(32,), num_pairs=(4,), learning_rates=(1e-2, 3e-2),
             seeds=(0, 1, 2), vocab_size=256, num_train=4_000, num_validation=256, batch_size=32, num_steps=700,
             warmup_steps=20, random_non_queries=True)

# Extended grid: the quick grid's data and learning rates at Zoology's shape of the problem, the gap growing with T and
# the number of pairs: (T, pairs) = (64, 4), (128, 8), (256, 16) at widths 64 and 128, 1,500 steps, three seeds.
# `shapes` lists the (T, pairs) points instead of crossing seq_lens with num_pairs. 324 runs: hours on 2 CPU cores
# (a T=64 run takes 1 (m2) to 10 (lightnet) minutes there), minutes each on an accelerator.
EXTENDED = dict(QUICK, d_models=(64, 128), shapes=((64, 4), (128, 8), (256, 16)), num_steps=1500, warmup_steps=100)


def define_flags():
  """The command-line flags (defined by the program only, so that importing the module defines none)."""
  define_study_flags("mqar_sweep", "grid")
  flags.DEFINE_bool("extended", False, "run the extended grid ((T, pairs) up to (256, 16), widths 64 and 128)")
  flags.DEFINE_list("d_models", None, "override the grid's widths")
  flags.DEFINE_list("seq_lens", None, "override the grid's sequence lengths")
  flags.DEFINE_list("num_pairs", None, "override the grid's numbers of key-value pairs")
  flags.DEFINE_list("learning_rates", None, "override the grid's learning rates")
  flags.DEFINE_list("seeds", None, "override the grid's seeds")
  flags.DEFINE_integer("num_steps", None, "override the grid's training steps")
  flags.DEFINE_string("data_dir", None, "where the generated MQAR datasets are stored")


def points(grid):
  """Every (mixer, d_model, seq_len, num_pairs, learning_rate, seed) of `grid`: its `shapes` (T, pairs), or else
  seq_lens x num_pairs with the pairs that do not fit dropped."""
  shapes = grid.get("shapes") or [(t, p) for t in grid["seq_lens"] for p in grid["num_pairs"] if 4 * p <= t]
  return [(m, d, t, p, lr, seed) for m in grid["mixers"] for t, p in shapes for d in grid["d_models"]
          for seed in grid["seeds"] for lr in grid["learning_rates"]]


def make_config(grid, mixer, d_model, seq_len, num_pairs, learning_rate, seed=0, data_dir=None):
  """The `configs/mqar.py` config of one run of the grid (`seed`: initialisation and data order)."""
  from configs import mqar  # pylint: disable=g-import-not-at-top
  config = mqar.get_config(mixer)
  config.model.d_model = d_model
  config.data.update(vocab_size=grid["vocab_size"], seq_len=seq_len, num_pairs=num_pairs,
                     num_train=grid["num_train"], num_validation=grid["num_validation"],
                     random_non_queries=grid["random_non_queries"])
  if data_dir:
    config.data.data_dir = data_dir
  config.seed = seed
  config.batch_size = grid["batch_size"]
  config.num_steps = grid["num_steps"]
  config.optimizer.learning_rate = learning_rate
  config.optimizer.warmup_steps = grid["warmup_steps"]
  config.eval_every = 0
  config.checkpoint_every = grid["num_steps"]
  config.keep_checkpoints = 1
  config.log_every = max(1, grid["num_steps"] // 4)
  config.plot = False
  return config


def run_name(mixer, d_model, seq_len, num_pairs, learning_rate, seed=0):
  return f"{mixer}_d{d_model}_T{seq_len}_P{num_pairs}_lr{learning_rate:g}" + (f"_seed{seed}" if seed else "")


def best_over_lr(rows):
  """One row per (mixer, d_model, seq_len, num_pairs, seed): the run with the highest accuracy (NaN counts as 0;
  rows without a seed are seed 0)."""
  best = {}
  for r in rows:
    key = (r["mixer"], r["d_model"], r["seq_len"], r["num_pairs"], r.get("seed", 0))
    acc = r["accuracy"] if r["accuracy"] == r["accuracy"] else 0.0
    if key not in best or acc > best[key][0]:
      best[key] = (acc, r)
  return [dict(v[1], accuracy=v[0], seed=k[-1]) for k, v in sorted(best.items())]


def over_seeds(best):
  """One row per (mixer, d_model, seq_len, num_pairs) of `best_over_lr`'s rows: accuracy = the mean over seeds,
  spread = best - worst seed, seeds = how many, accuracies and learning_rates per seed."""
  groups = {}
  for r in best:
    groups.setdefault((r["mixer"], r["d_model"], r["seq_len"], r["num_pairs"]), []).append(r)
  out = []
  for (mixer, d_model, seq_len, num_pairs), rs in sorted(groups.items()):
    accs = [r["accuracy"] for r in rs]
    out.append(dict(mixer=mixer, d_model=d_model, seq_len=seq_len, num_pairs=num_pairs,
                    accuracy=sum(accs) / len(accs), spread=max(accs) - min(accs), seeds=len(accs),
                    seed_accuracies=accs,
                    accuracies=" ".join(f"{a:.3f}" for a in accs),
                    learning_rates=" ".join(f"{r['learning_rate']:g}" for r in rs),
                    seconds=round(sum(r.get("seconds", 0.0) for r in rs), 1)))
  return out



def write_table(best, out):
  """Writes `over_seeds`'s rows to OUT/mqar.csv and OUT/mqar.json; returns the CSV path."""
  os.makedirs(out, exist_ok=True)
  fields = ["mixer", "d_model", "seq_len", "num_pairs", "accuracy", "spread", "seeds", "accuracies", "learning_rates",
            "seconds"]
  path = os.path.join(out, "mqar.csv")
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(best)
  with open(os.path.join(out, "mqar.json"), "w") as f:
    json.dump(best, f, indent=1)
  return path


def plot_accuracy_vs_width(best, path):
  """Zoology-style figure: a panel per (seq_len, num_pairs), mean accuracy over seeds vs d_model (log2), a line
  per mixer, bars from the worst to the best seed (rows of `over_seeds`)."""
  panels = sorted({(r["seq_len"], r["num_pairs"]) for r in best})
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.6, 3.4), squeeze=False)
  mixers = sorted({r["mixer"] for r in best}, key=lambda m: (MIXERS + (m,)).index(m))
  for ax, (t, p) in zip(axes[0], panels):
    for m in mixers:
      rows = sorted((r for r in best if (r["mixer"], r["seq_len"], r["num_pairs"]) == (m, t, p)),
                    key=lambda r: r["d_model"])
      if rows:
        means = [r["accuracy"] for r in rows]
        below = [max(mean - min(r["seed_accuracies"]), 0.0) for mean, r in zip(means, rows)]
        above = [max(max(r["seed_accuracies"]) - mean, 0.0) for mean, r in zip(means, rows)]
        ax.errorbar([r["d_model"] for r in rows], means, yerr=[below, above], marker="o", capsize=3, label=m)
    widths = sorted({r["d_model"] for r in best})
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"T={t}, {p} key-value pairs")
    ax.set_xlabel("model width (d_model)")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("MQAR accuracy (best LR)")
  axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
  return save_figure(fig, path)


def run_grid(grid, out, data_dir=None):
  """Trains every point of `grid` not yet in OUT/runs.jsonl; returns all rows."""
  os.makedirs(out, exist_ok=True)
  done = {r["name"] for r in read_runs(out)}
  todo = [p for p in points(grid) if run_name(*p) not in done]
  start = time.time()
  for i, p in enumerate(todo):
    name = run_name(*p)
    result = train_run(make_config(grid, *p, data_dir=data_dir), out, name)
    if result is None:
      return read_runs(out)
    row = dict(name=name, mixer=p[0], d_model=p[1], seq_len=p[2], num_pairs=p[3], learning_rate=p[4], seed=p[5],
               **result, num_steps=grid["num_steps"])
    append_run(out, row)
    print(f"[{i + 1}/{len(todo)}] {name}: accuracy={row['accuracy']:.3f} ({row['seconds']} s; {time.time() - start:.0f} s so far)",
          flush=True)
  return read_runs(out)


def main(argv):
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if FLAGS.extended and FLAGS.quick:
    raise app.UsageError("--quick and --extended are two grids: pass one")
  grid, out = study_grid("mqar_sweep", QUICK, EXTENDED if FLAGS.extended else FULL)
  if FLAGS.extended and not FLAGS.out:
    out = os.path.join("results", "mqar_sweep_extended")
  if FLAGS.d_models:
    grid["d_models"] = tuple(int(d) for d in FLAGS.d_models)
  for key in ("seq_lens", "num_pairs"):
    if FLAGS[key].value:
      grid[key] = tuple(int(v) for v in FLAGS[key].value)
      grid.pop("shapes", None)
  if FLAGS.learning_rates:
    grid["learning_rates"] = tuple(float(lr) for lr in FLAGS.learning_rates)
  if FLAGS.seeds:
    grid["seeds"] = tuple(int(s) for s in FLAGS.seeds)
  if FLAGS.num_steps:
    grid["num_steps"] = FLAGS.num_steps
  start = time.time()
  rows = read_runs(out) if FLAGS.plot_only else run_grid(grid, out, FLAGS.data_dir)
  summary = over_seeds(best_over_lr(rows))
  table = write_table(summary, out)
  figure = plot_accuracy_vs_width(summary, os.path.join(out, "mqar_accuracy_vs_width.png"))
  print(f"{'mixer':18s} {'d_model':>7s} {'T':>5s} {'pairs':>5s} {'mean':>6s} {'spread':>6s}  per seed (best lr)")
  for r in summary:
    print(f"{r['mixer']:18s} {r['d_model']:7d} {r['seq_len']:5d} {r['num_pairs']:5d} {r['accuracy']:6.3f} "
          f"{r['spread']:6.3f}  {r['accuracies']} ({r['learning_rates']})")
  print(f"table: {table}; figure: {figure}; wall time {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
