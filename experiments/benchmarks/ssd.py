"""Mamba2 SSD and Hydra's quasiseparable mixer: forward and forward+backward time and memory against T.

Rows per T (B=1, H=8, P=64, N=64, G=1, float32 unless --dtype):
  ssd            our causal SSD (impl="auto", chunk 64), softplus of the raw dt included
  mamba2_jax     the `mamba2-jax` package's `ssd_forward` (a pure-JAX port of the reference SSD), same inputs;
                 skipped when the package is not installed (`pip install --no-deps mamba2-jax`)
  quasiseparable Hydra's mixer, both directions in one pass
  two_ssd        two separate causal SSD calls (forward, and backward on the flipped sequence)
`fwd_bwd_cpu_ms` is the process CPU time of one forward+backward call, steadier than wall time on a machine
shared with other work. `ratio` (from CPU times): for ssd, mamba2_jax's fwd+bwd over ours; for quasiseparable
and two_ssd, theirs over one causal ssd's.
"""
import time

import jax
import jax.numpy as jnp

from experiments.benchmarks import common
from mixers.ops.quasiseparable import quasiseparable
from mixers.ops.ssd import ssd

BATCH, HEADS, HEAD_DIM, STATE, CHUNK = 1, 8, 64, 64, 64
MIN_LEN = 1024


def _peer():
  try:
    from mamba2_jax import ssd_forward  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return ssd_forward


def _inputs(t, dtype):
  ks = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(ks[0], (BATCH, t, HEADS, HEAD_DIM), dtype)
  dt_raw = jax.random.normal(ks[1], (BATCH, t, HEADS), dtype) - 2.0
  a = -jnp.exp(jax.random.uniform(ks[2], (HEADS,), jnp.float32, 0.0, 2.7))
  b = jax.random.normal(ks[3], (BATCH, t, 1, STATE), dtype)
  c = jax.random.normal(ks[4], (BATCH, t, 1, STATE), dtype)
  d = jnp.ones((HEADS,), jnp.float32)
  return x, dt_raw, a, b, c, d


def ours(x, dt_raw, a, b, c, d):
  return ssd(x, jax.nn.softplus(dt_raw), a, b, c, D=d, chunk_size=CHUNK)


def two_ssd(x, dt_raw, a, b, c, d):
  dt = jax.nn.softplus(dt_raw)
  flip = lambda u: jnp.flip(u, 1)
  fwd = ssd(x, dt, a, b, c, chunk_size=CHUNK)
  bwd = ssd(flip(x), flip(dt), a, flip(b), flip(c), chunk_size=CHUNK)
  shift = lambda u: jnp.pad(u, [(0, 0), (1, 0), (0, 0), (0, 0)])[:, :-1]
  return shift(fwd) + flip(shift(bwd)) + d[:, None] * x


def hydra(x, dt_raw, a, b, c, d):
  dt = jax.nn.softplus(dt_raw)
  return quasiseparable(x, (dt, dt), a, (b, b), (c, c), D=d, chunk_size=CHUNK)


def _peer_fn(ssd_forward):
  def peer(x, dt_raw, a, b, c, d):
    heads = lambda u: jnp.broadcast_to(u, (*u.shape[:2], HEADS, u.shape[-1]))
    y, _ = ssd_forward(x, dt_raw, a, heads(b), heads(c), CHUNK, d, jnp.zeros((HEADS,), dt_raw.dtype), 0.0,
                       float("inf"))
    return y
  return peer


def cpu_time(fn, *args, repeats=3):
  """Mean process CPU seconds of fn(*args) after a warm-up call (all threads of this process)."""
  common.block(fn(*args))
  start = time.process_time()
  for _ in range(repeats):
    common.block(fn(*args))
  return (time.process_time() - start) / repeats


def _measure(fn, args, repeats):
  fwd = jax.jit(fn)
  both = common.fwd_bwd(fn)
  peak = common.peak_bytes(jax.value_and_grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(6))), *args)
  return (1e3 * common.time_fn(fwd, *args, repeats=repeats), 1e3 * common.time_fn(both, *args, repeats=repeats),
          1e3 * cpu_time(both, *args, repeats=repeats), None if peak is None else peak / 2 ** 20)


def run(args):
  dtype = jnp.dtype(getattr(args, "dtype", "float32"))
  repeats = getattr(args, "repeats", 3)
  peer = _peer()
  fns = {"ssd": ours, "mamba2_jax": _peer_fn(peer) if peer else None, "quasiseparable": hydra, "two_ssd": two_ssd}
  rows = []
  t = MIN_LEN
  while t <= args.max_len:
    inputs = _inputs(t, dtype)
    times = {}
    for name, fn in fns.items():
      if fn is None:
        continue
      fwd_ms, both_ms, both_cpu_ms, peak = _measure(fn, inputs, repeats)
      times[name] = both_cpu_ms
      rows.append(dict(op=name, T=t, fwd_ms=fwd_ms, fwd_bwd_ms=both_ms, fwd_bwd_cpu_ms=both_cpu_ms,
                       cpu_us_per_token=1e3 * both_cpu_ms / t, fwd_bwd_peak_MiB=peak))
    for r in rows[-len(times):]:
      ref = times.get("mamba2_jax") if r["op"] == "ssd" else times["ssd"]
      r["ratio"] = None if ref is None or r["op"] == "mamba2_jax" else (
          ref / r["fwd_bwd_cpu_ms"] if r["op"] == "ssd" else r["fwd_bwd_cpu_ms"] / ref)
    t *= 2
  return rows
