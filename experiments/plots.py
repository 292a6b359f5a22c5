"""Training curves of a workdir as PNG files: one panel per metric, train and eval together.

    python -m experiments.plots --workdir workdirs/mqar      # -> workdirs/mqar/plots/*.png
"""
import os

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments.trainer import logging as logging_lib  # pylint: disable=wrong-import-position

PANELS = ("loss", "accuracy", "learning_rate", "grad_norm", "tokens_per_second")


def _panels(series):
  """{panel: {"train": points, "eval": points}} for the metrics present."""
  out = {}
  for name, points in series.items():
    prefix, _, metric = name.partition("/")
    out.setdefault(metric or prefix, {})[prefix if metric else ""] = points
  order = {p: i for i, p in enumerate(PANELS)}
  return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def write_plots(workdir, out_dir=None):
  """Writes `curves.png` (every panel) and one `<metric>.png` per metric; returns the paths."""
  series = logging_lib.read_metrics(workdir)
  out_dir = out_dir or os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  panels = _panels(series)
  paths = []
  cols = min(3, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
  for ax in axes.flat[len(panels):]:
    ax.axis("off")
  for ax, (metric, lines) in zip(axes.flat, panels.items()):
    _draw(ax, metric, lines)
    single, single_ax = plt.subplots(figsize=(5, 3.5))
    _draw(single_ax, metric, lines)
    single.tight_layout()
    paths.append(os.path.join(out_dir, f"{metric}.png"))
    single.savefig(paths[-1], dpi=100)
    plt.close(single)
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  paths.insert(0, os.path.join(out_dir, "curves.png"))
  fig.savefig(paths[0], dpi=100)
  plt.close(fig)
  return paths


def _draw(ax, metric, lines):
  for label, points in sorted(lines.items(), key=lambda kv: kv[0] != "train"):
    steps, values = zip(*points)
    ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label or metric)
  ax.set_title(metric.replace("_", " "))
  ax.set_xlabel("step")
  if metric == "loss" and all(v > 0 for pts in lines.values() for _, v in pts):
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def main(argv):
  del argv
  for path in write_plots(flags.FLAGS.workdir):
    print(path)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "a training workdir (holds metrics.jsonl)")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
