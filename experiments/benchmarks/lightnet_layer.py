"""Where the LightNet layer's time goes, beside the GLA layer: layer variants and the layer's parts, fwd and fwd+bwd.

One causal layer `[B=1, T, d_model] -> [B, T, d_model]` at the `mixers` suite's widths (d_model / 64 heads):

  gla                          keys 32 per head (expand_k = 0.5), values 64: a state of 32 x 64 per head
  lightnet                     keys 64 per head, MD-LRPE doubles them: a state of 128 x 64 per head
  lightnet, no lrpe            use_lrpe=False: 64 x 64
  lightnet, keys 32            head_dim=32 (GLA's key width) with MD-LRPE: 64 x 64
  lightnet, keys 32, no lrpe   the state GLA has: 32 x 64

and the LightNet layer's parts at its default shapes: the key normaliser (running log-sum-exp over time, the keys and
the per-channel log-decays it gives), the gated recurrence at the lightnet state width (2K with MD-LRPE) beside the
recurrence at GLA's.
Median seconds of a jitted call (experiments/benchmarks/common.py) at each T in LENGTHS up to --max_len.
"""
import jax
import jax.numpy as jnp

import mixers
from experiments.benchmarks import common
from mixers.ops.lightnet import causal_keys
from mixers.ops.recurrence import gated_linear_recurrence

LENGTHS = (2048, 8192)
HEAD_DIM = 64

LAYERS = (
    ("gla", "gla", {}),
    ("lightnet", "lightnet", {}),
    ("lightnet, no lrpe", "lightnet", {"use_lrpe": False}),
    ("lightnet, keys 32", "lightnet", {"head_dim": HEAD_DIM // 2}),
    ("lightnet, keys 32, no lrpe", "lightnet", {"head_dim": HEAD_DIM // 2, "use_lrpe": False}),
)


def _layer_times(name, kwargs, x, repeats):
  model = mixers.build_mixer(name, causal=True, num_heads=max(1, x.shape[-1] // HEAD_DIM), **kwargs)
  params = jax.jit(model.init)(jax.random.key(0), x[:, :64])
  return _part_times(lambda p, u: model.apply(p, u), (params, x), repeats)


def _normaliser(k):
  k_norm, log_decay, _ = causal_keys(k)
  return k_norm, log_decay


def _recurrence(q, k, v, g):
  return gated_linear_recurrence(q, k, v, g, scale=q.shape[-1] ** -0.5)[0]


def _part_times(f, args, repeats):
  return (common.time_fn(jax.jit(f), *args, repeats=repeats),
          common.time_fn(common.fwd_bwd(f), *args, repeats=repeats))


def _parts(t, d_model, repeats):
  """(name, fwd seconds, fwd+bwd seconds) of the LightNet layer's parts at length t."""
  h = max(1, d_model // HEAD_DIM)
  keys = jax.random.split(jax.random.key(2), 4)
  normal = lambda key, width: jax.random.normal(key, (1, t, h, width), jnp.float32)
  k = normal(keys[0], HEAD_DIM)
  decay = -jax.nn.softplus(normal(keys[3], 2 * HEAD_DIM))
  wide = (normal(keys[1], 2 * HEAD_DIM), jax.nn.sigmoid(normal(keys[2], 2 * HEAD_DIM)), normal(keys[0], HEAD_DIM),
          decay)
  narrow = (wide[0][..., :HEAD_DIM // 2], wide[1][..., :HEAD_DIM // 2], wide[2], decay[..., :HEAD_DIM // 2])
  return [("normaliser (logcumsumexp, K=64)", *_part_times(_normaliser, (k,), repeats)),
          ("recurrence, keys 128 (lightnet)", *_part_times(_recurrence, wide, repeats)),
          ("recurrence, keys 32 (gla)", *_part_times(_recurrence, narrow, repeats))]


def run(args):
  rows = []
  d_model = getattr(args, "d_model", None) or 256
  for t in (t for t in LENGTHS if t <= args.max_len) if args.max_len >= LENGTHS[0] else (args.max_len,):
    x = jax.random.normal(jax.random.key(1), (1, t, d_model), jnp.float32)
    base = None
    for label, name, kwargs in LAYERS:
      fwd, fwd_bwd = _layer_times(name, kwargs, x, args.repeats)
      base = base or (fwd, fwd_bwd)
      rows.append({"T": t, "d_model": d_model, "what": f"layer: {label}", "fwd_s": fwd, "fwdbwd_s": fwd_bwd,
                   "fwd/gla": fwd / base[0], "fwdbwd/gla": fwd_bwd / base[1]})
      print(rows[-1], flush=True)
    for label, fwd, fwd_bwd in _parts(t, d_model, args.repeats):
      rows.append({"T": t, "d_model": d_model, "what": f"part: {label}", "fwd_s": fwd, "fwdbwd_s": fwd_bwd,
                   "fwd/gla": fwd / base[0], "fwdbwd/gla": fwd_bwd / base[1]})
      print(rows[-1], flush=True)
  return rows
