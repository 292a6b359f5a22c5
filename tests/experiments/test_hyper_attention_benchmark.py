"""The hyper_attention benchmark suite through the benchmark driver at tiny sizes."""
import csv

from experiments import benchmark
from experiments.benchmarks import common
from experiments.benchmarks import hyper_attention as suite


def test_hyper_attention_suite_at_tiny_sizes(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(suite, "LENGTHS", (48, 96))
  monkeypatch.setattr(suite, "H", 1)
  monkeypatch.setattr(suite, "SETTINGS", dict(block_size=16, sample_size=8, min_seq_len=12, lsh_num_projs=3))
  monkeypatch.setattr(common, "matmul_tflops", lambda: 0.125)
  benchmark.main(["--suite", "hyper_attention", "--max_len", "64", "--repeats", "1", "--csv", str(tmp_path / "b.csv")])
  with open(tmp_path / "b.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [(r["suite"], r["T"], r["causal"]) for r in rows] == [("hyper_attention", "48", "False"),
                                                               ("hyper_attention", "48", "True")]
  for r in rows:
    for column in ("softmax_fwd_s", "hyper_fwd_s", "softmax_fwdbwd_s", "hyper_fwdbwd_s", "softmax/hyper_fwdbwd"):
      assert float(r[column]) > 0, column
    assert r["approximate"] == "True" and 1e-3 < float(r["err_over_v"]) < 1, r["err_over_v"]  # T=48 > 2 min_seq_len
    assert float(r["rel_error"]) > 1e-3
  out = capsys.readouterr().out
  assert "## hyper_attention" in out and "matmul_fp32=0.125" in out
  assert "hyper_attention non-causal: approximate forward+backward faster than softmax from" in out
