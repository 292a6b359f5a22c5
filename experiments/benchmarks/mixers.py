"""Every registered sequence mixer: forward and forward+backward time and peak memory vs T and d_model.

One layer `[B=1, T, d_model] -> [B, T, d_model]`, causal where the mixer supports it (hydra and vssd are
non-causal only), built by `mixers.build_mixer`. Widths at the default d_model = 256 (heads scale as
d_model / 64 in the d_model sweep, so every attention-like head stays 64 wide):

  attention         4 heads of 64, rotary, causal softmax (the quadratic baseline)
  linear_attention  4 heads of 64, elu+1 feature map (64 features), normalised
  retention         4 heads of 64, fixed per-head decay
  gla               4 heads, keys 32 (expand_k = 0.5) and values 64 per head, low-rank gates
  lightnet          4 heads of 64 (the layer's default is 8 of 32)
  mamba2            expand 2: 8 heads of 64 over a 512-wide inner stream, state 128 (Mamba2's default)
  hydra             expand 2: 8 heads of 64, state 64 (Hydra's default), non-causal
  vssd              expand 2: 8 heads of 64, state 64, non-causal
  m2                d_model channels of gated implicit long convolution (FFT), filter length scale = T
  (any other)       its registered defaults

The SSM family keeps its own expand-2 inner width: that is the unit which replaces attention (and
usually the MLP) in those papers. Each time is `common.time_fn`'s median after a warm-up call; memory
is the peak XLA plans for one call (`common.peak_bytes`), so it is known before the call is run. A
mixer's length sweep stops once its forward+backward call exceeds `--time_budget` seconds, is
predicted (from its last two points) to exceed four times that, or plans more than `--max_mem_gib`.
Rows also carry the process CPU seconds per forward+backward call (steadier than wall time on a
shared machine) and the forward+backward time relative to attention's at the same (T, d_model).
"""
import math
import time

import jax
import jax.numpy as jnp

import mixers
from experiments.benchmarks import common
from mixers import registry

LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
D_MODELS = (128, 256, 512, 1024)
D_MODEL_SWEEP_LEN = 2048
HEAD_DIM = 64
REFERENCE = "attention"
_SSM = ("mamba2", "hydra", "vssd")


def mixer_kwargs(name, d_model, t):
  """Constructor arguments of mixer `name` at width d_model and length t (see the module docstring)."""
  heads = max(1, d_model // HEAD_DIM)
  if name in _SSM:
    return dict(expand=2, head_dim=HEAD_DIM)
  if name == "m2":
    return dict(max_len=t)
  if name in ("attention", "linear_attention", "retention", "gla", "lightnet"):
    return dict(num_heads=heads)
  return {}


def build(name, d_model, t, dtype):
  causal = registry.is_causal_capable(name)
  return mixers.build_mixer(name, causal=causal, dtype=dtype, **mixer_kwargs(name, d_model, t)), causal


def _cpu_and_wall(fn, args, repeats):
  """(median wall seconds, process CPU seconds per call) of an already compiled fn."""
  cpu0 = time.process_time()
  wall = common.time_fn(fn, *args, repeats=repeats)
  return wall, (time.process_time() - cpu0) / (repeats + 1)


def _compiled(fn, args):
  return jax.jit(fn).lower(*args).compile()


def measure(model, params, x, repeats, max_bytes):
  """Times and peak bytes of model's forward and forward+backward; None times when over max_bytes."""
  fwd = jax.jit(lambda p, u: model.apply(p, u))
  fwd_bwd = common.fwd_bwd(lambda p, u: model.apply(p, u))
  out = {}
  for tag, fn in (("fwd", fwd), ("fwdbwd", fwd_bwd)):
    peak = common.peak_bytes(fn, params, x)  # compiles once; the AOT compile below is then a cache hit
    out[f"{tag}_MiB"] = None if peak is None else peak / 2 ** 20
    if peak is not None and peak > max_bytes:
      out["note"] = f"{tag} plans {peak / 2 ** 30:.1f} GiB > limit"
      return out
    compiled = _compiled(fn, (params, x))
    wall, cpu = _cpu_and_wall(compiled, (params, x), repeats)
    out[f"{tag}_s"] = wall
    if tag == "fwdbwd":
      out["fwdbwd_cpu_s"] = cpu
  return out


def _init(name, d_model, dtype):
  model, _ = build(name, d_model, 64, dtype)
  x = jnp.zeros((1, 64, d_model), dtype)
  params = jax.jit(model.init)(jax.random.key(0), x)
  return params, sum(a.size for a in jax.tree.leaves(params))


def _input(t, d_model, dtype):
  return jax.random.normal(jax.random.key(1), (1, t, d_model), dtype)


def _predicted(points, t):
  """Time at length t extrapolated in log-log from the last two (T, seconds) points (slope >= 1)."""
  (t0, s0), (t1, s1) = points[-2:] if len(points) > 1 else (points[-1], points[-1])
  slope = max(1.0, math.log(s1 / s0) / math.log(t1 / t0)) if t1 != t0 else 1.0
  return s1 * (t / t1) ** slope


def length_sweep(name, lengths, d_model, opts, params, n_params):
  """Rows for T in lengths until a call exceeds the time budget (or is predicted to, or plans too much memory)."""
  rows, points = [], []
  for t in lengths:
    if points and _predicted(points, t) > 4 * opts["time_budget"]:
      print(f"  {name}: stop before T={t} (predicted {_predicted(points, t):.1f} s per call)", flush=True)
      break
    model, causal = build(name, d_model, t, opts["dtype"])
    row = {"sweep": "T", "mixer": name, "causal": causal, "T": t, "d_model": d_model, "params": n_params}
    row.update(measure(model, params, _input(t, d_model, opts["dtype"]), opts["repeats"], opts["max_bytes"]))
    rows.append(row)
    print(f"  {row}", flush=True)
    if row.get("fwdbwd_s") is None:
      break
    points.append((t, row["fwdbwd_s"]))
    if row["fwdbwd_s"] > opts["time_budget"]:
      break
  return rows


def run(args):
  """Rows of the T sweep (at --d_model) and the d_model sweep (at D_MODEL_SWEEP_LEN) for each mixer."""
  opts = dict(dtype=jnp.dtype(getattr(args, "dtype", "float32")), repeats=args.repeats,
              time_budget=getattr(args, "time_budget", 5.0),
              max_bytes=getattr(args, "max_mem_gib", 6.0) * 2 ** 30)
  d_model = getattr(args, "d_model", None) or 256
  names = getattr(args, "mixer", None) or registry.names("sequence")
  unknown = [n for n in names if n not in registry.names("sequence")]
  if unknown:
    raise ValueError(f"mixer must be among {registry.names('sequence')}, got {unknown}")
  lengths = [t for t in LENGTHS if getattr(args, "min_len", 0) <= t <= args.max_len]
  d_models = getattr(args, "d_models", None)
  d_models = D_MODELS if d_models is None else d_models
  sweep_len = min(D_MODEL_SWEEP_LEN, args.max_len)
  rows = []
  for name in names:
    params, n_params = _init(name, d_model, opts["dtype"])
    t_rows = length_sweep(name, lengths, d_model, opts, params, n_params)
    rows += t_rows
    for d in d_models:
      done = [r for r in t_rows if r["d_model"] == d and r["T"] == sweep_len]
      if done:
        rows.append({**done[0], "sweep": "d_model"})
        continue
      p, n = _init(name, d, opts["dtype"])
      model, causal = build(name, d, sweep_len, opts["dtype"])
      row = {"sweep": "d_model", "mixer": name, "causal": causal, "T": sweep_len, "d_model": d, "params": n}
      row.update(measure(model, p, _input(sweep_len, d, opts["dtype"]), opts["repeats"], opts["max_bytes"]))
      rows.append(row)
      print(f"  {row}", flush=True)
  return add_reference_ratio(rows)


def add_reference_ratio(rows, reference=REFERENCE):
  """Adds `vs_attention`: fwd+bwd seconds over the reference mixer's at the same sweep, T and d_model."""
  ref = {(r["sweep"], r["T"], r["d_model"]): r.get("fwdbwd_s") for r in rows if r["mixer"] == reference}
  for r in rows:
    s, base = r.get("fwdbwd_s"), ref.get((r["sweep"], r["T"], r["d_model"]))
    r[f"vs_{reference}"] = s / base if s is not None and base else None
  return rows


def crossover_length(lengths, times, reference_times):
  """Smallest T where `times` < `reference_times`, interpolated in log-log between grid points.

  Only lengths where both are measured (not None / NaN) count. Returns the crossover T (the first
  compared length when the mixer is already faster there), or None when it is never faster.
  """
  pts = [(t, a, b) for t, a, b in zip(lengths, times, reference_times)
         if a is not None and b is not None and not (math.isnan(a) or math.isnan(b))]
  pts.sort()
  prev = None
  for t, a, b in pts:
    r = math.log(a / b)  # < 0: faster than the reference
    if r < 0:
      if prev is None:
        return float(t)
      t0, r0 = prev
      frac = r0 / (r0 - r)
      return float(math.exp(math.log(t0) + frac * (math.log(t) - math.log(t0))))
    prev = (t, r)
  return None


def crossovers(rows, reference=REFERENCE, sweep="T", column="fwdbwd_s"):
  """{mixer: (crossover T or None, smallest compared T, largest compared T)} of `column` in the T sweep."""
  def series(name):
    return {int(r["T"]): _float(r.get(column)) for r in rows
            if r.get("mixer") == name and r.get("sweep") == sweep}
  ref = series(reference)
  out = {}
  for name in sorted({r["mixer"] for r in rows if r.get("sweep") == sweep and r.get("mixer") != reference}):
    own = series(name)
    common_t = sorted(t for t in own if t in ref and own[t] is not None and ref[t] is not None)
    cross = crossover_length(common_t, [own[t] for t in common_t], [ref[t] for t in common_t])
    out[name] = (cross, common_t[0] if common_t else None, common_t[-1] if common_t else None)
  return out


def describe_crossover(cross, first, last, reference=REFERENCE):
  if first is None:
    return f"no length measured for both it and {reference}"
  if cross is None:
    return f"none up to T={last}"
  if cross <= first:
    return f"<= {first} (faster at every measured T)"
  return f"T ~ {cross:.0f}"


def _float(v):
  if v in (None, ""):
    return None
  return float(v)
