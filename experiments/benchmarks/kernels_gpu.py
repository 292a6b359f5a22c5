r"""Pallas chunked-recurrence kernels on a GPU, beside the chunked XLA form, cuDNN flash attention and fla.

  python -m experiments.benchmark --suite kernels_gpu --max_len 32768 --repeats 10

B=1, H=16, K=V=128, bf16, T = 2048..max_len (doubling), forward and forward+backward, for a scalar decay
per token and head (fla's `chunk_simple_gla`) and a per-key-channel decay (fla's `chunk_gla`). Columns:
milliseconds per call and the Pallas kernel's speed-up over each other form; `rel_err` is the relative RMS
difference between the kernel and the chunked XLA form (outputs, and for fwd+bwd the gradients).
fla columns appear when `torch` and `flash-linear-attention` import (pip install torch
flash-linear-attention). Without a CUDA GPU the suite returns one row saying so.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common
from mixers.kernels import chunked_recurrence
from mixers.ops.recurrence import gated_linear_recurrence

B, H, DK, DV, CHUNK = 1, 16, 128, 128, 64
LENGTHS = (2048, 4096, 8192, 16384, 32768)
DECAYS = ("scalar", "channel")
# True runs the kernels in the Pallas interpreter on any backend: a check of the suite's code on a CPU (the tests
# set it with small shapes); its timings mean nothing.
INTERPRET = False


def unavailable(suite, backend="gpu"):
  """The one row a kernel suite returns when its backend ("gpu" | "tpu") is not here (None when it can run)."""
  if jax.default_backend() == backend or INTERPRET:
    return None
  device = "a CUDA GPU" if backend == "gpu" else "a TPU"
  return [{"note": f"{suite} needs {device}; JAX backend is {jax.default_backend()}"}]


def make_inputs(t, decay):
  """q, k, v `[B,t,H,D]` bf16 and the log decay `[B,t,H]` (scalar) or `[B,t,H,K]` (channel) float32, near 0
  (gates sigmoid(N(4, 1)), mean 0.97): the suites' inputs, the same for every form compared."""
  ks = jax.random.split(jax.random.key(t), 4)
  q, k = (jax.random.normal(x, (B, t, H, DK), jnp.bfloat16) for x in ks[:2])
  k = k * DK**-0.5
  v = jax.random.normal(ks[2], (B, t, H, DV), jnp.bfloat16)
  shape = (B, t, H) if decay == "scalar" else (B, t, H, DK)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], shape, jnp.float32) + 4.0)
  return q, k, v, g


def pallas(q, k, v, g, *, backend="gpu", chunk_size=None, tuning=None):
  """The Pallas kernel's output on `backend`, in chunks of chunk_size (default CHUNK) with the GPU `tuning`; in the
  interpreter when INTERPRET."""
  return chunked_recurrence(q, k, v, g, scale=DK**-0.5, initial_state=None, chunk_size=chunk_size or CHUNK,
                            backend=backend, tuning=tuning, interpret=INTERPRET)[0]


def chunked(q, k, v, g):
  return gated_linear_recurrence(q, k, v, g, scale=DK**-0.5, chunk_size=CHUNK, impl="chunked")[0]


def _flash(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def rel_err(a, b):
  a, b = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (a, b))
  return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-12))


def _fla():
  """(torch, {decay: fla function}) or None when torch / fla are not importable."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from fla.ops.gla import chunk_gla  # pylint: disable=import-outside-toplevel
    from fla.ops.simple_gla import chunk_simple_gla  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  return torch, {"scalar": chunk_simple_gla, "channel": chunk_gla}


def _time_torch(torch, fn, repeats):
  fn()
  torch.cuda.synchronize()
  times = []
  for _ in range(repeats):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
  return float(np.median(times))


def _fla_seconds(fla, decay, inputs, backward, repeats):
  torch, fns = fla
  to_torch = lambda x: torch.from_numpy(np.asarray(jnp.asarray(x, jnp.float32))).cuda()
  q, k, v, g = inputs
  tq, tk, tv = (to_torch(x).to(torch.bfloat16).requires_grad_(backward) for x in (q, k, v))
  tg = to_torch(g).requires_grad_(backward)
  fn = fns[decay]

  def call():
    o = fn(tq, tk, tv, tg, scale=DK**-0.5)[0]
    if backward:
      o.float().sum().backward()
    return o

  if not backward:
    with torch.no_grad():
      return _time_torch(torch, call, repeats)
  return _time_torch(torch, call, repeats)


def modes():
  """(mode, how a function is compiled for it): the forward alone, and forward+backward."""
  return (("fwd", jax.jit), ("fwd+bwd", common.fwd_bwd))


def timer(fn, *args, repeats):
  """A zero-argument callable giving the median seconds of the compiled fn(*args) (for `measure`)."""
  return lambda: common.time_fn(fn, *args, repeats=repeats)


def measure(row, pallas, xla, inputs, others, repeats):
  """Fills row with `rel_err` (the Pallas call against the chunked XLA form, every output leaf), `pallas_ms`,
  `chunked_xla_ms`, one `<name>_ms` per entry of others ({name: zero-argument callable giving seconds}; None and a
  note when it fails here) and the kernel's speed-up over each, `x_vs_<name>`."""
  row["rel_err"] = max(rel_err(a, b) for a, b in zip(jax.tree.leaves(pallas(*inputs)), jax.tree.leaves(xla(*inputs))))
  row["pallas_ms"] = 1e3 * common.time_fn(pallas, *inputs, repeats=repeats)
  timed = {"chunked_xla": timer(xla, *inputs, repeats=repeats), **others}
  for name, seconds in timed.items():
    try:
      row[name + "_ms"] = 1e3 * seconds()
    except Exception as e:  # pylint: disable=broad-except
      row[name + "_ms"] = None
      row["note"] = f"{name}: {type(e).__name__}"
  for name in timed:
    if row[name + "_ms"]:
      row["x_vs_" + name] = row[name + "_ms"] / row["pallas_ms"]
  return row


def run(args):
  note = unavailable("kernels_gpu")
  if note:
    return note
  repeats = max(args.repeats, 3)
  lengths = [t for t in LENGTHS if t <= args.max_len]
  fla = _fla()
  rows = []
  for decay in DECAYS:
    for t in lengths:
      inputs = make_inputs(t, decay)
      for mode, wrap in modes():
        others = {"cudnn_flash": timer(wrap(_flash), *inputs[:3], repeats=repeats)}
        if fla is not None:
          others["fla"] = functools.partial(_fla_seconds, fla, decay, inputs, mode != "fwd", repeats)
        row = {"decay": decay, "T": t, "mode": mode}
        rows.append(measure(row, wrap(pallas), wrap(chunked), inputs, others, repeats))
  return rows
