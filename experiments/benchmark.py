r"""Speed and memory benchmarks of the mixers, printed as tables (and optionally written as CSV).

  python -m experiments.benchmark --suite linear_attention
  python -m experiments.benchmark --suite linear_attention --max_len 16384 --csv results/la.csv

Each suite lives in experiments/benchmarks/<suite>.py and returns rows; timings are medians of several
runs after a warm-up call, on whatever backend JAX sees.
"""
import argparse
import csv
import importlib
import os
import pkgutil

import jax

from experiments import benchmarks
from experiments.benchmarks import common


def suites():
  return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name != "common")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--suite", action="append", help=f"one of {suites()} (repeatable; default: all)")
  parser.add_argument("--max_len", type=int, default=65536, help="largest sequence length")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--csv", help="also write the rows to this CSV file")
  args = parser.parse_args(argv)
  chosen = args.suite or suites()
  unknown = [s for s in chosen if s not in suites()]
  if unknown:
    parser.error(f"unknown suite(s) {unknown}; valid suites: {suites()}")
  print(f"backend={jax.default_backend()} devices={jax.devices()} "
        f"matmul_fp32={common.matmul_tflops():.3f} TFLOP/s")
  all_rows = []
  for name in chosen:
    rows = importlib.import_module(f"experiments.benchmarks.{name}").run(args)
    common.print_table(rows, title=name)
    all_rows += [{"suite": name, **r} for r in rows]
  if args.csv:
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    cols = []
    for r in all_rows:
      cols += [c for c in r if c not in cols]
    with open(args.csv, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=cols)
      w.writeheader()
      w.writerows(all_rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
  main()
