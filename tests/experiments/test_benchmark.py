"""The benchmark driver on the mixers suite (tiny sizes), its CSV and plots, and the crossover helper."""
import csv
import json
import math

import pytest

from experiments import benchmark
from experiments.benchmarks import common
from experiments.benchmarks import mixers as mixer_suite

COLUMNS = {"suite", "sweep", "mixer", "causal", "T", "d_model", "params", "fwd_s", "fwdbwd_s", "fwd_MiB",
           "fwdbwd_MiB", "fwdbwd_cpu_s", "vs_attention"}
PLOTS = ("time_vs_T.png", "memory_vs_T.png", "speedup_vs_T.png", "time_vs_d_model.png")


def test_quick_run_writes_csv_summary_and_plots(tmp_path, monkeypatch):
  monkeypatch.setattr(mixer_suite, "LENGTHS", (64, 128, 8192))
  monkeypatch.setattr(mixer_suite, "D_MODELS", (64, 128))
  monkeypatch.setattr(mixer_suite, "D_MODEL_SWEEP_LEN", 64)
  monkeypatch.setattr(common, "matmul_tflops", lambda: 0.125)
  benchmark.main(["--suite", "mixers", "--quick", "--min_len", "64", "--max_len", "128", "--d_model", "64", "--mixer", "attention",
                  "--mixer", "linear_attention", "--results", str(tmp_path)])

  with open(tmp_path / "benchmark.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert COLUMNS <= set(rows[0])
  got = sorted((r["mixer"], r["sweep"], int(r["T"]), int(r["d_model"])) for r in rows)
  want = sorted((m, s, t, d) for m in ("attention", "linear_attention")
                for s, t, d in (("T", 64, 64), ("T", 128, 64), ("d_model", 64, 64), ("d_model", 64, 128)))
  assert got == want
  for r in rows:
    assert float(r["fwd_s"]) > 0 and float(r["fwdbwd_s"]) > 0 and float(r["fwdbwd_MiB"]) > 0
    assert r["causal"] == "True"
  for r in rows:
    if r["mixer"] == "attention":
      assert float(r["vs_attention"]) == 1.0

  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["machine"]["matmul_fp32_tflops"] == 0.125
  assert set(summary["crossover"]) == {"linear_attention"}
  assert summary["crossover"]["linear_attention"]["compared_to"] == 128
  assert "crossover_T_cpu" in summary["crossover"]["linear_attention"]
  for name in PLOTS:
    data = (tmp_path / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_quick_caps_length_and_repeats():
  args = benchmark.parse_args(["--suite", "mixers", "--quick", "--repeats", "7"])
  assert (args.max_len, args.repeats) == (benchmark.QUICK_MAX_LEN, benchmark.QUICK_REPEATS)
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--suite", "no_such_suite"])


LENGTHS = [1024, 2048, 4096, 8192, 16384]


def test_crossover_interpolates_power_laws_in_log_log():
  # mixer 3000 * T, reference T^2: equal at T = 3000, between the grid points 2048 and 4096.
  mixer = [3000.0 * t for t in LENGTHS]
  ref = [float(t) ** 2 for t in LENGTHS]
  assert mixer_suite.crossover_length(LENGTHS, mixer, ref) == pytest.approx(3000.0, rel=1e-9)
  assert mixer_suite.describe_crossover(3000.0, 1024, 16384) == "T ~ 3000"


def test_crossover_first_point_none_and_missing_values():
  ref = [float(t) ** 2 for t in LENGTHS]
  faster = [0.5 * t for t in LENGTHS]
  assert mixer_suite.crossover_length(LENGTHS, faster, ref) == 1024.0
  assert mixer_suite.describe_crossover(1024.0, 1024, 16384).startswith("<= 1024")
  slower = [1e9 * t for t in LENGTHS]
  assert mixer_suite.crossover_length(LENGTHS, slower, ref) is None
  assert mixer_suite.describe_crossover(None, 1024, 16384) == "none up to T=16384"
  # The reference stopped after 4096 (time budget): later points cannot be compared.
  partial = ref[:3] + [None, math.nan]
  late = [1e5 * t for t in LENGTHS]  # would cross at 1e5, beyond every grid point
  assert mixer_suite.crossover_length(LENGTHS, late, partial) is None


def test_crossovers_from_rows_uses_the_length_sweep_only():
  rows = [{"sweep": "T", "mixer": "attention", "T": t, "fwdbwd_s": float(t) ** 2} for t in LENGTHS[:3]]
  rows += [{"sweep": "T", "mixer": "gla", "T": t, "fwdbwd_s": 3000.0 * t} for t in LENGTHS]
  rows += [{"sweep": "d_model", "mixer": "gla", "T": 1024, "fwdbwd_s": 1e-9}]
  (cross, first, last), = mixer_suite.crossovers(rows).values()
  assert cross == pytest.approx(3000.0) and (first, last) == (1024, 4096)
