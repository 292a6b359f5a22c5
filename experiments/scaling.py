"""Compute-optimal frontiers of byte-level language models: a family of sizes per mixer under equal FLOP budgets.

    python -m experiments.scaling --quick              # tiny models on the stdlib `email` package, 2 CPU cores
    python -m experiments.scaling                      # the full family; the same configs run on a pod
    python -m experiments.scaling --plot_only --out results/scaling_quick

For a budget C (FLOPs ~ 6 N D, N non-embedding parameters, D training tokens) every size trains for
D = C / (6 N) tokens; the frontier of a mixer is its lowest validation loss per budget, fitted by
loss = a * C^-b + c. Runs append to `OUT/runs.jsonl` (a rerun skips those done); fits go to `OUT/fits.json`,
the figure to `OUT/scaling_frontiers.png`.
"""
import json
import math
import os
import time

from absl import app
from absl import flags
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments.study_runs import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    append_run, define_study_flags, read_runs, save_figure, short_run_schedule, study_grid, train_run)

# Full family: widths 128..768 at depths 4..12 and budgets 1e15..1e18 FLOPs on the whole standard library
# (or any --corpus); on a pod the trainer's mesh {"data": -1} spreads each run over every device.
FULL = dict(mixers=("attention", "gla", "mamba2", "retention"),
            sizes=((128, 4), (256, 4), (384, 6), (512, 8), (768, 12)),
            budgets=(1e15, 3e15, 1e16, 3e16, 1e17, 3e17, 1e18),
            seq_len=512, batch_size=64, learning_rate=2e-3, corpus="", min_steps=50)

# Quick family: two tiny sizes and five budgets on a 1 MB corpus; each run is 10..2,600 steps (a size
# whose budget buys fewer than min_steps steps is skipped).
QUICK = dict(mixers=("attention", "gla", "mamba2", "retention"),
             sizes=((32, 1), (64, 2)),
             budgets=(5e9, 1.5e10, 4.5e10, 1.35e11, 4.05e11),
             seq_len=128, batch_size=16, learning_rate=3e-3, corpus="email", min_steps=10)



def define_flags():
  """The command-line flags (defined by the program only, so that importing the module defines none)."""
  define_study_flags("scaling", "family")
  flags.DEFINE_string("corpus", None, "override the corpus (file or directory of *.py files)")


def resolve_corpus(name):
  """'' = the whole standard library; a bare package name = that stdlib package's directory; else a path."""
  if not name or os.path.sep in name or os.path.exists(name):
    return name
  import sysconfig  # pylint: disable=g-import-not-at-top
  return os.path.join(sysconfig.get_paths()["stdlib"], name)


def make_config(family, mixer, d_model, num_layers, num_steps):
  """The `configs/lm.py` config of one run."""
  from configs import lm  # pylint: disable=g-import-not-at-top
  config = lm.get_config(mixer)
  config.model.d_model = d_model
  config.model.num_layers = num_layers
  config.data.seq_len = family["seq_len"]
  config.data.corpus = resolve_corpus(family["corpus"])
  config.batch_size = family["batch_size"]
  config.eval_batch_size = family["batch_size"]
  return short_run_schedule(config, num_steps, family["learning_rate"])


def non_embedding_params(config):
  """N: parameters of the model of `config` outside the token embedding (shapes only, nothing initialised)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments.trainer import config as trainer_config  # pylint: disable=g-import-not-at-top
  from mixers import models  # pylint: disable=g-import-not-at-top
  config, _ = trainer_config.resolve(config)
  model = models.build_model(config.model)
  tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return sum(math.prod(x.shape) for path, x in leaves if "embed" not in jax.tree_util.keystr(path).lower())


def steps_for_budget(budget, n_params, tokens_per_step):
  """Training steps so that 6 * N * tokens = budget."""
  return max(1, round(budget / (6.0 * n_params * tokens_per_step)))


def fit_power_law(compute, loss):
  """(a, b, c) minimising sum (a C^-b + c - loss)^2 over c in [0, min loss): for each c, log(loss - c) is
  linear in log C (least squares gives a, b); the c with the smallest residual in loss space wins."""
  compute, loss = np.asarray(compute, np.float64), np.asarray(loss, np.float64)
  if compute.size < 3:
    raise ValueError(f"compute has {compute.size} points: expected >= 3 to fit a, b and c")
  x = np.log(compute)
  best = None
  for c in np.concatenate([np.linspace(0.0, loss.min(), 2000, endpoint=False)]):
    A = np.stack([np.ones_like(x), -x], axis=1)
    (log_a, b), *_ = np.linalg.lstsq(A, np.log(loss - c), rcond=None)
    err = float(np.sum((np.exp(log_a) * compute ** -b + c - loss) ** 2))
    if best is None or err < best[0]:
      best = (err, float(np.exp(log_a)), float(b), float(c))
  return best[1:]


def frontier(rows):
  """{mixer: [(budget, best loss, d_model, num_layers)] sorted by budget}: the lowest loss per budget."""
  out = {}
  for r in rows:
    if r["loss"] != r["loss"]:
      continue
    key = (r["mixer"], r["budget"])
    if key not in out or r["loss"] < out[key][1]:
      out[key] = (r["budget"], r["loss"], r["d_model"], r["num_layers"])
  fronts = {}
  for (mixer, _), point in sorted(out.items()):
    fronts.setdefault(mixer, []).append(point)
  return fronts


def fit_frontiers(fronts):
  """{mixer: dict(a, b, c)} for frontiers with >= 3 budgets."""
  fits = {}
  for mixer, pts in fronts.items():
    if len(pts) >= 3:
      a, b, c = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
      fits[mixer] = dict(a=a, b=b, c=c)
  return fits


def plot_frontiers(rows, fronts, fits, path):
  """Every run faint, each mixer's frontier bold, its fitted a C^-b + c dashed; log-log axes."""
  fig, ax = plt.subplots(figsize=(6, 4.2))
  colors = {}
  for mixer, pts in fronts.items():
    line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=2, label=mixer)
    colors[mixer] = line.get_color()
    if mixer in fits:
      f = fits[mixer]
      cs = np.geomspace(pts[0][0], pts[-1][0], 50)
      ax.plot(cs, f["a"] * cs ** -f["b"] + f["c"], ls="--", color=colors[mixer],
              label=f"{mixer} fit: {f['a']:.3g} C^-{f['b']:.3f} + {f['c']:.3g}")
  for r in rows:
    if r["mixer"] in colors and r["loss"] == r["loss"]:
      ax.scatter(r["budget"], r["loss"], s=10, color=colors[r["mixer"]], alpha=0.35)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("training compute C = 6 N D (FLOPs)")
  ax.set_ylabel("validation loss (nats / byte)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  return save_figure(fig, path)



def run_family(family, out):
  """Trains every (mixer, size, budget) not yet in OUT/runs.jsonl; returns all rows."""
  os.makedirs(out, exist_ok=True)
  done = {r["name"] for r in read_runs(out)}
  tokens_per_step = family["batch_size"] * family["seq_len"]
  start = time.time()
  for mixer in family["mixers"]:
    for d_model, num_layers in family["sizes"]:
      n = non_embedding_params(make_config(family, mixer, d_model, num_layers, 1))
      for budget in family["budgets"]:
        name = f"{mixer}_d{d_model}_L{num_layers}_C{budget:.2g}"
        steps = steps_for_budget(budget, n, tokens_per_step)
        if name in done or steps < family["min_steps"]:
          continue
        result = train_run(make_config(family, mixer, d_model, num_layers, steps), out, name)
        if result is None:
          return read_runs(out)
        row = dict(name=name, mixer=mixer, d_model=d_model, num_layers=num_layers, params=n, budget=budget,
                   steps=steps, tokens=steps * tokens_per_step, loss=result["loss"], seconds=result["seconds"])
        append_run(out, row)
        print(f"{name}: N={n:,} steps={steps} loss={row['loss']:.4f} ({row['seconds']} s; "
              f"{time.time() - start:.0f} s so far)", flush=True)
  return read_runs(out)


def main(argv):
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  family, out = study_grid("scaling", QUICK, FULL)
  if FLAGS.corpus is not None:
    family["corpus"] = FLAGS.corpus
  start = time.time()
  rows = read_runs(out) if FLAGS.plot_only else run_family(family, out)
  fronts = frontier(rows)
  fits = fit_frontiers(fronts)
  with open(os.path.join(out, "fits.json"), "w") as f:
    json.dump({"fits": fits, "frontiers": fronts}, f, indent=1)
  figure = plot_frontiers(rows, fronts, fits, os.path.join(out, "scaling_frontiers.png"))
  for mixer, pts in fronts.items():
    f = fits.get(mixer)
    fit = f"loss = {f['a']:.4g} C^-{f['b']:.4f} + {f['c']:.4g}" if f else "fewer than 3 budgets: no fit"
    print(f"{mixer:12s} frontier " + ", ".join(f"C={p[0]:.2g}: {p[1]:.4f} (d={p[2]}, L={p[3]})" for p in pts)
          + f"; {fit}")
  print(f"figure: {figure}; wall time {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
