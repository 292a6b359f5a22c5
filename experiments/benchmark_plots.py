r"""Log-log plots of the `mixers` benchmark suite from its CSV.

  python -m experiments.benchmark_plots results/benchmark/benchmark.csv results/benchmark

(also prints the softmax-attention crossover lengths again from the CSV).

Writes time_vs_T.png and memory_vs_T.png (forward and forward+backward panels, reference slopes T and
T^2), speedup_vs_T.png (attention's fwd+bwd time over each mixer's: above 1 means faster than
attention) and time_vs_d_model.png (reference slopes d and d^2).
"""
import csv
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib import ticker  # pylint: disable=g-import-not-at-top

REFERENCE = "attention"


def read_rows(path):
  """The `mixers` suite rows of a benchmark CSV, numbers parsed (empty cells -> None)."""
  with open(path, newline="") as f:
    rows = [r for r in csv.DictReader(f) if r.get("suite", "mixers") == "mixers"]
  out = []
  for r in rows:
    parsed = dict(r)
    for k in ("T", "d_model", "fwd_s", "fwdbwd_s", "fwd_MiB", "fwdbwd_MiB"):
      v = r.get(k)
      parsed[k] = float(v) if v not in (None, "") else None
    out.append(parsed)
  return out


def _series(rows, sweep, x, y):
  """{mixer: ([x], [y])} of the rows of one sweep, sorted by x, points with a y only."""
  out = {}
  for r in sorted(rows, key=lambda r: (r["mixer"], r[x])):
    if r["sweep"] == sweep and r[y] is not None:
      xs, ys = out.setdefault(r["mixer"], ([], []))
      xs.append(r[x])
      ys.append(r[y])
  return out


def _style(names):
  colors = plt.get_cmap("tab10").colors
  others = [n for n in names if n != REFERENCE]
  style = {n: dict(color=colors[i % len(colors)], marker="os^vD<>ph*"[i % 10], lw=1.4, ms=4)
           for i, n in enumerate(others)}
  style[REFERENCE] = dict(color="black", marker="o", lw=2.4, ms=5)
  return style


def _reference_slopes(ax, series, powers, symbol):
  """Grey lines proportional to x^p, starting at half the lowest first point."""
  firsts = [(xs[0], ys[0]) for xs, ys in series.values() if xs]
  if not firsts:
    return
  x_lo = min(x for xs, _ in series.values() for x in xs)
  x_hi = max(x for xs, _ in series.values() for x in xs)
  y0 = 0.5 * min(y for x, y in firsts if x == x_lo)  # below every curve, so the lines stay visible
  for p, ls in zip(powers, (":", "--")):
    label = f"∝ {symbol}" + ("" if p == 1 else "²³⁴"[p - 2])
    ax.plot([x_lo, x_hi], [y0, y0 * (x_hi / x_lo) ** p], color="grey", ls=ls, lw=1, label=label)


def _log_axes(ax):
  """Log-log axes with plain-number tick labels (no mathtext: it is slow and 2^k reads worse than 4096)."""
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  for axis in (ax.xaxis, ax.yaxis):
    axis.set_minor_formatter(ticker.NullFormatter())
  ax.grid(True, which="both", alpha=0.3)


def _panel(ax, series, style, causal, title, xlabel, ylabel, powers, symbol):
  for name, (xs, ys) in sorted(series.items()):
    tag = "" if causal.get(name, True) else " (non-causal)"
    ax.plot(xs, ys, label=name + tag, **style[name])
  _reference_slopes(ax, series, powers, symbol)
  _log_axes(ax)
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)


def _figure(rows, sweep, x, ys, titles, ylabel, xlabel, powers, symbol, path, suptitle):
  names = sorted({r["mixer"] for r in rows})
  style = _style(names)
  causal = {r["mixer"]: r.get("causal") in ("True", True) for r in rows}
  fig, axes = plt.subplots(1, len(ys), figsize=(6.2 * len(ys), 5), squeeze=False)
  for ax, y, title in zip(axes[0], ys, titles):
    _panel(ax, _series(rows, sweep, x, y), style, causal, title, xlabel, ylabel, powers, symbol)
  handles, labels = axes[0][-1].get_legend_handles_labels()
  fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9, frameon=False)
  fig.suptitle(suptitle)
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def _speedup(rows, path, d_model):
  names = sorted({r["mixer"] for r in rows})
  style = _style(names)
  series = _series(rows, "T", "T", "fwdbwd_s")
  ref = dict(zip(*series.get(REFERENCE, ([], []))))
  fig, ax = plt.subplots(figsize=(7.5, 5))
  for name, (xs, ys) in sorted(series.items()):
    pts = [(x, ref[x] / y) for x, y in zip(xs, ys) if name != REFERENCE and x in ref]
    if pts:
      ax.plot(*zip(*pts), label=name, **style[name])
  ax.axhline(1.0, color="black", lw=2, label=f"{REFERENCE} (= 1)")
  _log_axes(ax)
  ax.set_xlabel("sequence length T")
  ax.set_ylabel(f"{REFERENCE} fwd+bwd time / mixer fwd+bwd time")
  ax.set_title(f"speed-up over softmax attention (d_model={d_model}, B=1); crossover where a curve passes 1")
  ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9, frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def plot_all(csv_path, out_dir):
  """Writes the four PNGs into out_dir and returns their paths."""
  rows = read_rows(csv_path)
  os.makedirs(out_dir, exist_ok=True)
  t_rows = [r for r in rows if r["sweep"] == "T"]
  d_rows = [r for r in rows if r["sweep"] == "d_model"]
  d_model = int(t_rows[0]["d_model"]) if t_rows else None
  fixed_t = int(d_rows[0]["T"]) if d_rows else None
  panels = ("forward", "forward + backward")
  paths = [
      _figure(rows, "T", "T", ("fwd_s", "fwdbwd_s"), panels, "seconds (median)", "sequence length T",
              (1, 2), "T", os.path.join(out_dir, "time_vs_T.png"),
              f"time per call vs T (d_model={d_model}, B=1)"),
      _figure(rows, "T", "T", ("fwd_MiB", "fwdbwd_MiB"), panels, "planned peak MiB", "sequence length T",
              (1, 2), "T", os.path.join(out_dir, "memory_vs_T.png"),
              f"peak memory vs T (d_model={d_model}, B=1; arguments + outputs + temporaries)"),
      _speedup(rows, os.path.join(out_dir, "speedup_vs_T.png"), d_model),
      _figure(rows, "d_model", "d_model", ("fwd_s", "fwdbwd_s"), panels, "seconds (median)", "d_model",
              (1, 2), "d", os.path.join(out_dir, "time_vs_d_model.png"),
              f"time per call vs d_model (T={fixed_t}, B=1)"),
  ]
  return paths


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit("usage: python -m experiments.benchmark_plots BENCHMARK_CSV OUT_DIR")
  for p in plot_all(sys.argv[1], sys.argv[2]):
    print(f"wrote {p}")
  from experiments import benchmark  # pylint: disable=g-import-not-at-top
  with open(sys.argv[1], newline="") as f:
    benchmark.print_crossovers([r for r in csv.DictReader(f) if r.get("suite", "mixers") == "mixers"])
