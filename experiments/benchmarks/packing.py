"""Packed sequences (segment_ids) against one unpacked sequence of the same length: forward+backward time per op.

B=1, H=4, K=V=64, fp32 (or --dtype), chunk 64. The packed row holds documents of random lengths (mean
`MEAN_DOCUMENT` tokens, so their starts fall anywhere in a chunk); `packed/unpacked` is the ratio of median
forward+backward seconds, measured side by side. long_conv lays each segment out in its own row, so its cost
grows with the segment count (reported as measured).
"""
import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common
from mixers import ops

B, H, D = 1, 4, 64
LENGTHS = (2048, 8192)
MEAN_DOCUMENT = 512


def segment_ids(t, seed=0):
  """`[1, T]` ids of documents with lengths drawn uniformly from [1, 2 * MEAN_DOCUMENT)."""
  rng = np.random.default_rng(seed)
  lengths = []
  while sum(lengths) < t:
    lengths.append(int(rng.integers(1, 2 * MEAN_DOCUMENT)))
  return jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None, :t], jnp.int32), len(lengths)


def _inputs(t, dtype):
  keys = jax.random.split(jax.random.key(0), 5)
  q, k, v = (jax.random.normal(keys[i], (B, t, H, D), jnp.float32) for i in range(3))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, t, H, D)) + 4.0) / 16
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (B, t, H)))
  return tuple(a.astype(dtype) for a in (q, k, v, g, beta))


def ops_under_test(segments):
  """name -> f(q, k, v, g, beta, ids): ids `[1,T]` or None (unpacked); `segments` bounds long_conv's rows."""
  a = -jnp.linspace(0.5, 4.0, H)
  return {
      "linear_attention (per-head decay)": lambda q, k, v, g, beta, ids: ops.linear_attention(
          q, k, v, log_decay=g[..., 0], segment_ids=ids, impl="chunked"),
      "gla (per-channel decay)": lambda q, k, v, g, beta, ids: ops.linear_attention(
          q, k, v, log_decay=g, segment_ids=ids, impl="chunked"),
      "ssd (mamba2)": lambda q, k, v, g, beta, ids: ops.ssd(
          v, jax.nn.softplus(g[..., 0]), a, k[:, :, :1], q[:, :, :1], segment_ids=ids, impl="chunked"),
      "quasiseparable (hydra)": lambda q, k, v, g, beta, ids: ops.quasiseparable(
          v, (beta, beta), a, (k[:, :, :1], q[:, :, :1]), (q[:, :, :1], k[:, :, :1]), segment_ids=ids),
      "delta_rule (gated)": lambda q, k, v, g, beta, ids: ops.delta_rule(
          q, k, v, beta, log_decay=g[..., 0], segment_ids=ids, impl="chunked"),
      "lightnet": lambda q, k, v, g, beta, ids: ops.lightnet(q, k, v, segment_ids=ids, impl="chunked"),
      "attention (causal)": lambda q, k, v, g, beta, ids: ops.attention(q, k, v, causal=True, segment_ids=ids),
      "long_conv": lambda q, k, v, g, beta, ids: ops.long_conv(
          v[:, :, 0], g[0, :, 0], segment_ids=ids, max_segments=None if ids is None else segments),
  }


def fwd_bwd(f):
  """Jitted value and gradient (for q, k, v, g, beta) of sum(f(...)); the ids are an argument, not a constant."""
  loss = lambda *args: sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(f(*args)))
  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(5))))


def run(args):
  rows = []
  for t in (t for t in LENGTHS if t <= args.max_len):
    inputs = _inputs(t, jnp.dtype(args.dtype))
    ids, segments = segment_ids(t)
    for name, f in ops_under_test(segments).items():
      row = {"op": name, "T": t, "segments": segments}
      row["unpacked_fwdbwd_s"] = common.time_fn(fwd_bwd(f), *inputs, None, repeats=args.repeats)
      row["packed_fwdbwd_s"] = common.time_fn(fwd_bwd(f), *inputs, ids, repeats=args.repeats)
      row["packed/unpacked"] = row["packed_fwdbwd_s"] / row["unpacked_fwdbwd_s"]
      rows.append(row)
      print(row, flush=True)
  return rows
