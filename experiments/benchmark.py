r"""Speed and memory benchmarks of the mixers, printed as tables (and optionally written as CSV and plots).

  python -m experiments.benchmark --suite mixers --results results/benchmark
  python -m experiments.benchmark --suite mixers --quick --results /tmp/bench     # T <= 4096, 2 repeats
  python -m experiments.benchmark --suite linear_attention --max_len 16384 --csv results/la.csv
  python -m experiments.benchmark --suite attention_patterns --quick    # self / cross x causal / non-causal

Each suite lives in experiments/benchmarks/<suite>.py and returns rows; timings are medians of several
runs after a warm-up call, on whatever backend JAX sees. `--results DIR` writes DIR/benchmark.csv,
DIR/summary.json (backend, measured matmul throughput, softmax-attention crossover lengths) and, for
the `mixers` suite, log-log PNGs of time and memory versus T and time versus d_model.
"""
import argparse
import csv
import importlib
import json
import os
import pkgutil
import sys

import jax

from experiments import benchmarks
from experiments.benchmarks import common

QUICK_MAX_LEN = 4096
QUICK_REPEATS = 2


def suites():
  return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name != "common")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--suite", action="append", help=f"one of {suites()} (repeatable; default: all)")
  parser.add_argument("--max_len", type=int, default=65536, help="largest sequence length")
  parser.add_argument("--min_len", type=int, default=1024, help="mixers: smallest sequence length")
  parser.add_argument("--d_models", type=lambda s: tuple(int(v) for v in s.split(",") if v), default=None,
                      help="mixers: comma-separated widths of the d_model sweep ('' skips it)")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per point (after one warm-up)")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--d_model", type=int, default=256, help="model width of the length sweep (mixers)")
  parser.add_argument("--mixer", action="append", help="restrict the mixers suite to these (repeatable)")
  parser.add_argument("--time_budget", type=float, default=5.0,
                      help="mixers: stop a mixer's length sweep once a forward+backward call takes longer")
  parser.add_argument("--max_mem_gib", type=float, default=6.0,
                      help="mixers: skip a point whose planned peak memory exceeds this")
  parser.add_argument("--quick", action="store_true",
                      help=f"smoke run: T <= {QUICK_MAX_LEN} and {QUICK_REPEATS} repeats")
  parser.add_argument("--csv", help="also write the rows to this CSV file")
  parser.add_argument("--results", help="write benchmark.csv, summary.json and the plots into this folder")
  args = parser.parse_args(argv)
  chosen = args.suite or suites()
  unknown = [s for s in chosen if s not in suites()]
  if unknown:
    parser.error(f"unknown suite(s) {unknown}; valid suites: {suites()}")
  args.suite = chosen
  if args.quick:
    args.max_len = min(args.max_len, QUICK_MAX_LEN)
    args.repeats = min(args.repeats, QUICK_REPEATS)
  return args


def write_csv(path, rows):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  cols = []
  for r in rows:
    cols += [c for c in r if c not in cols]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
  print(f"wrote {path}")


def print_crossovers(rows):
  """Prints and returns each mixer's softmax-attention crossover length (fwd+bwd) from the T sweep.

  By median wall time, and by process CPU time per call (steadier when other work shares the machine).
  """
  from experiments.benchmarks import mixers as mixer_suite
  wall = mixer_suite.crossovers(rows, column="fwdbwd_s")
  cpu = mixer_suite.crossovers(rows, column="fwdbwd_cpu_s")
  print(f"\n## crossover with {mixer_suite.REFERENCE}: smallest T where a forward+backward call is faster")
  out = {}
  for name, (cross, first, last) in wall.items():
    text = mixer_suite.describe_crossover(cross, first, last)
    cpu_text = mixer_suite.describe_crossover(*cpu[name])
    print(f"{name:>18}: {text:<40} (by CPU time: {cpu_text})")
    out[name] = {"crossover_T": cross, "compared_from": first, "compared_to": last, "text": text,
                 "crossover_T_cpu": cpu[name][0], "text_cpu": cpu_text}
  return out


def main(argv=None):
  args = parse_args(argv)
  tflops = common.matmul_tflops()
  machine = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
             "matmul_fp32_tflops": tflops, "jax": jax.__version__,
             "command": " ".join(["python -m experiments.benchmark", *(sys.argv[1:] if argv is None else argv)])}
  print(f"backend={machine['backend']} devices={jax.devices()} matmul_fp32={tflops:.3f} TFLOP/s")
  all_rows = []
  for name in args.suite:
    rows = importlib.import_module(f"experiments.benchmarks.{name}").run(args)
    common.print_table(rows, title=name)
    all_rows += [{"suite": name, **r} for r in rows]
  mixer_rows = [r for r in all_rows if r["suite"] == "mixers"]
  summary = {"machine": machine}
  if mixer_rows:
    summary["crossover"] = print_crossovers(mixer_rows)
  if args.csv:
    write_csv(args.csv, all_rows)
  if args.results:
    path = os.path.join(args.results, "benchmark.csv")
    write_csv(path, all_rows)
    with open(os.path.join(args.results, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    if mixer_rows:
      from experiments import benchmark_plots
      for png in benchmark_plots.plot_all(path, args.results):
        print(f"wrote {png}")
  return all_rows, summary


if __name__ == "__main__":
  main()
