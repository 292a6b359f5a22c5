"""The four attention patterns (self / cross x causal / non-causal) of the attention-like layers: time and memory vs T.

One layer `[B=1, T, d_model] -> [B, T, d_model]` built by `mixers.build_mixer` (heads of 64, as in the `mixers`
suite): attention, linear_attention, gla, retention, and hyper_attention when it is registered. Patterns:

  self_causal         layer(x), causal=True
  self_noncausal      layer(x), causal=False
  cross_causal        layer(x, context=c), causal=True, c `[B, T, d_model]` (target t reads sources s <= t)
  cross_noncausal     layer(x, context=c), causal=False, c `[B, T, d_model]`
  cross_noncausal_2x  the same with a source twice as long (Tk = 2T); a mixer that pairs target and source
                      positions (gla, retention: their decays run along one shared axis) refuses it, and its row
                      says so (as does a mixer without a `context` argument for every cross pattern)

Each point: median seconds of a forward and of a forward+backward (gradients for the parameters, x and c) after a
warm-up call, and the peak bytes XLA plans for each (arguments + outputs + temporaries, as `common.peak_bytes`). A
(mixer, pattern) sweep over T stops once its forward+backward exceeds `--time_budget` seconds or plans more than
`--max_mem_gib`. `vs_self_causal` is the forward+backward time over the same mixer's self-causal one at that T.
"""
import jax
import jax.numpy as jnp

import mixers
from experiments.benchmarks import common
from mixers import registry

LENGTHS = (512, 2048, 8192)
HEAD_DIM = 64
BASE_MIXERS = ("attention", "linear_attention", "gla", "retention")
OPTIONAL_MIXERS = ("hyper_attention",)
# name -> (causal, source length over target length; None: self)
PATTERNS = {
    "self_causal": (True, None),
    "self_noncausal": (False, None),
    "cross_causal": (True, 1),
    "cross_noncausal": (False, 1),
    "cross_noncausal_2x": (False, 2),
}


def default_mixers():
  registered = registry.names("sequence")
  return BASE_MIXERS + tuple(m for m in OPTIONAL_MIXERS if m in registered)


def build(name, d_model, causal, dtype):
  """The layer `name` with heads of HEAD_DIM where it has a num_heads argument, else its defaults."""
  heads = {"num_heads": max(1, d_model // HEAD_DIM)} if "num_heads" in registry.fields(registry.get(name)) else {}
  return mixers.build_mixer(name, causal=causal, dtype=dtype, **heads)


def _inputs(t, ratio, d_model, dtype):
  x = jax.random.normal(jax.random.key(1), (1, t, d_model), dtype)
  c = None if ratio is None else jax.random.normal(jax.random.key(2), (1, ratio * t, d_model), dtype)
  return x, c


def _functions(model, cross):
  if cross:
    f = lambda p, x, c: model.apply(p, x, context=c)
  else:
    f = lambda p, x: model.apply(p, x)
  return jax.jit(f), common.fwd_bwd(f)


def _planned_bytes(compiled):
  """Arguments + outputs + temporaries XLA plans for a compiled call (None if the backend does not say)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
          - getattr(stats, "alias_size_in_bytes", 0))


def measure(model, args_, repeats, max_bytes):
  """Seconds and planned MiB of the forward and forward+backward; stops at the first part over max_bytes.

  Each function is compiled once (ahead of time); its memory plan is read before it runs."""
  fwd, fwd_bwd = _functions(model, len(args_) == 3)
  out = {}
  for tag, fn in (("fwd", fwd), ("fwdbwd", fwd_bwd)):
    compiled = fn.lower(*args_).compile()
    peak = _planned_bytes(compiled)
    out[f"{tag}_MiB"] = None if peak is None else peak / 2 ** 20
    if peak is not None and peak > max_bytes:
      out["note"] = f"{tag} plans {peak / 2 ** 30:.1f} GiB > limit"
      return out
    out[f"{tag}_s"] = common.time_fn(compiled, *args_, repeats=repeats)
  return out


def sweep(name, pattern, lengths, d_model, opts):
  """Rows of one (mixer, pattern) over lengths, until the time budget or the memory limit is passed."""
  causal, ratio = PATTERNS[pattern]
  model = build(name, d_model, causal, opts["dtype"])
  rows = []
  for t in lengths:
    x, c = _inputs(t, ratio, d_model, opts["dtype"])
    row = {"mixer": name, "pattern": pattern, "T": t, "Tk": t if c is None else c.shape[1], "d_model": d_model}
    try:
      params = jax.jit(model.init)(jax.random.key(0), x, **({} if c is None else {"context": c}))
    except (ValueError, TypeError) as e:  # the mixer refuses this pattern (Tk != T, or no context argument)
      rows.append({**row, "note": "refused: " + str(e).splitlines()[0]})
      print(f"  {rows[-1]}", flush=True)
      break
    row.update(measure(model, (params, x) if c is None else (params, x, c), opts["repeats"], opts["max_bytes"]))
    rows.append(row)
    print(f"  {row}", flush=True)
    if row.get("fwdbwd_s") is None or row["fwdbwd_s"] > opts["time_budget"]:
      break
  return rows


def add_self_causal_ratio(rows):
  """`vs_self_causal`: forward+backward seconds over the same mixer's self-causal ones at that T."""
  base = {(r["mixer"], r["T"]): r.get("fwdbwd_s") for r in rows if r["pattern"] == "self_causal"}
  for r in rows:
    s, b = r.get("fwdbwd_s"), base.get((r["mixer"], r["T"]))
    r["vs_self_causal"] = s / b if s is not None and b else None
  return rows


def run(args):
  opts = dict(dtype=jnp.dtype(getattr(args, "dtype", "float32")), repeats=args.repeats,
              time_budget=getattr(args, "time_budget", 5.0), max_bytes=getattr(args, "max_mem_gib", 6.0) * 2 ** 30)
  d_model = getattr(args, "d_model", None) or 256
  names = getattr(args, "mixer", None) or default_mixers()
  unknown = [n for n in names if n not in registry.names("sequence")]
  if unknown:
    raise ValueError(f"mixer must be among {registry.names('sequence')}, got {unknown}")
  lengths = [t for t in LENGTHS if t <= args.max_len]
  rows = []
  for name in names:
    for pattern in PATTERNS:
      rows += sweep(name, pattern, lengths, d_model, opts)
  return add_self_causal_ratio(rows)
