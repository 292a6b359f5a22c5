r"""Warps and pipeline stages of each GPU kernel phase, measured: the table to choose `tuning` from.

  python -m experiments.benchmark --suite kernels_gpu_tuning --max_len 8192 --repeats 10

B=1, H=16, K=V=128, bf16, T = max_len (8192 by default), chunks of 64, scalar and per-channel decays, forward and
backward. One phase at a time takes each (num_warps, num_stages) in {2, 4, 8} x {1, 2, 3} while the other phases keep
4 warps and 1 stage; columns: milliseconds of the call (forward for the forward's phases, forward+backward for the
backward's), and the ratio to 4 warps / 1 stage in the same run. A phase's best row is the `tuning` entry to pass to
`mixers.kernels.chunked_recurrence` for that shape. Without a CUDA GPU the suite returns one row saying so.
"""
import functools
import itertools

import jax

from experiments.benchmarks import common
from experiments.benchmarks import kernels_gpu

WARPS, STAGES = (2, 4, 8), (1, 2, 3)
# the phases each call runs: the forward's in "fwd", all four in "fwd+bwd"
MODES = {"state_pass": "fwd", "output": "fwd", "dstate_pass": "fwd+bwd", "gradients": "fwd+bwd"}


def _call(tuning, mode):
  fn = functools.partial(kernels_gpu.pallas, tuning=tuning)
  return jax.jit(fn) if mode == "fwd" else common.fwd_bwd(fn)


def run(args):
  note = kernels_gpu.unavailable("kernels_gpu_tuning")
  if note:
    return note
  repeats = max(args.repeats, 3)
  t = min(args.max_len, 32768)
  rows = []
  for decay in kernels_gpu.DECAYS:
    inputs = kernels_gpu.make_inputs(t, decay)
    base = {mode: 1e3 * common.time_fn(_call(None, mode), *inputs, repeats=repeats) for mode in set(MODES.values())}
    for phase, mode in MODES.items():
      for warps, stages in itertools.product(WARPS, STAGES):
        row = {"decay": decay, "T": t, "phase": phase, "mode": mode, "num_warps": warps, "num_stages": stages}
        try:
          row["ms"] = 1e3 * common.time_fn(_call(((phase, warps, stages),), mode), *inputs, repeats=repeats)
          row["x_vs_4w1s"] = base[mode] / row["ms"]
        except Exception as e:  # pylint: disable=broad-except
          row["ms"], row["note"] = None, f"{type(e).__name__}: {str(e)[:80]}"  # e.g. shared memory exceeded
        rows.append(row)
  return rows
