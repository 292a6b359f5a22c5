"""The GPU and TPU kernel suites' code on a CPU: the Pallas interpreter at small shapes (timings mean nothing here; the
rows, the error column and the fallbacks are what is checked)."""
import argparse

import jax
import pytest

from experiments.benchmarks import common
from experiments.benchmarks import kernels_gpu
from experiments.benchmarks import kernels_gpu_tuning
from experiments.benchmarks import kernels_tpu
from mixers.kernels import chunk_gpu


@pytest.fixture
def small_interpreted(monkeypatch):
  for name, value in dict(B=1, H=2, DK=16, DV=16, CHUNK=16, LENGTHS=(32, 64), INTERPRET=True).items():
    monkeypatch.setattr(kernels_gpu, name, value)
  time_fn = common.time_fn
  monkeypatch.setattr(common, "time_fn", lambda fn, *args, repeats: time_fn(fn, *args, repeats=1))


def _args(max_len):
  return argparse.Namespace(max_len=max_len, repeats=1)


def test_without_a_gpu_each_suite_returns_one_row_saying_so():
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is attached: the suites run for real")
  for suite in (kernels_gpu, kernels_gpu_tuning):
    rows = suite.run(_args(8192))
    assert len(rows) == 1 and "needs a CUDA GPU" in rows[0]["note"]
  if jax.default_backend() != "tpu":
    assert kernels_tpu.run(_args(8192)) == [
        {"note": f"kernels_tpu needs a TPU; JAX backend is {jax.default_backend()}"}]


def test_kernels_gpu_rows_compare_the_kernel_with_the_chunked_form(small_interpreted):
  rows = kernels_gpu.run(_args(32))  # T=64 is above max_len
  assert [(r["decay"], r["T"], r["mode"]) for r in rows] == [
      (d, 32, m) for d in kernels_gpu.DECAYS for m in ("fwd", "fwd+bwd")]
  for r in rows:
    assert r["rel_err"] < 2e-2, r  # bf16 inputs; the outputs and, for fwd+bwd, every gradient
    assert r["pallas_ms"] > 0 and r["chunked_xla_ms"] > 0
    assert r["x_vs_chunked_xla"] == pytest.approx(r["chunked_xla_ms"] / r["pallas_ms"])
    if jax.default_backend() != "gpu":
      assert r["cudnn_flash_ms"] is None and r["note"].startswith("cudnn_flash") and "x_vs_cudnn_flash" not in r


def test_kernels_gpu_rel_err_sees_a_wrong_kernel(small_interpreted, monkeypatch):
  monkeypatch.setattr(kernels_gpu, "pallas", lambda q, k, v, g: kernels_gpu.chunked(q, k, v, 0.5 * g))
  monkeypatch.setattr(kernels_gpu, "DECAYS", ("scalar",))
  rows = kernels_gpu.run(_args(32))
  assert all(r["rel_err"] > 0.1 for r in rows), rows


def test_tuning_phases_are_the_kernels_phases():
  for phase in kernels_gpu_tuning.MODES:
    assert chunk_gpu.check_tuning(((phase, 2, 3),)) == ((phase, 2, 3),)


def test_tuning_rows_time_each_setting_against_the_default(small_interpreted, monkeypatch):
  monkeypatch.setattr(kernels_gpu, "DECAYS", ("channel",))
  monkeypatch.setattr(kernels_gpu_tuning, "MODES", {"state_pass": "fwd"})
  monkeypatch.setattr(kernels_gpu_tuning, "WARPS", (2,))
  monkeypatch.setattr(kernels_gpu_tuning, "STAGES", (2,))
  rows = kernels_gpu_tuning.run(_args(32))
  assert [(r["decay"], r["T"], r["phase"], r["num_warps"], r["num_stages"]) for r in rows] == [
      ("channel", 32, "state_pass", 2, 2)]
  assert rows[0]["ms"] > 0 and rows[0]["x_vs_4w1s"] > 0, rows


def test_kernels_tpu_rows_compare_the_kernel_with_the_chunked_form(small_interpreted):
  rows = kernels_tpu.run(_args(32))
  assert [(r["decay"], r["T"], r["mode"]) for r in rows] == [
      (d, 32, m) for d in kernels_gpu.DECAYS for m in ("fwd", "fwd+bwd")]
  for r in rows:
    assert r["rel_err"] < 2e-2, r
    assert r["pallas_ms"] > 0 and r["chunked_xla_ms"] > 0
    # no TPU generation here: chunks widen from 16 to the whole T (at most 128); one grid step per head
    assert r["chunk"] == r["T"] and r["grid_steps"] == kernels_gpu.B * kernels_gpu.H
    assert r["x_fewer_steps"] == pytest.approx(r["T"] / 64)
