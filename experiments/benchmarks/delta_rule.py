"""The chunked delta rule (DeltaNet, Gated DeltaNet) vs GLA's chunked gated linear recurrence, forward+backward.

B=1, H=8, K=V=64, fp32 (or --dtype), chunk 64; median seconds of a forward and of a forward+backward, and the
peak bytes XLA plans for the forward+backward. GLA here is `linear_attention` with per-key-channel decays (the
layer's op); the delta rule adds a triangular solve per chunk and a [K,K] x [K,V] product per chunk state.
"""
import jax
import jax.numpy as jnp

from experiments.benchmarks import common
from mixers import ops

B, H, D = 1, 8, 64
LENGTHS = (1024, 4096, 8192, 16384, 65536)


def delta_net(q, k, v, beta, g):
  del g
  return ops.delta_rule(q, k, v, beta, impl="chunked")


def gated_delta_net(q, k, v, beta, g):
  return ops.delta_rule(q, k, v, beta, log_decay=g[..., 0], impl="chunked")


def gla(q, k, v, beta, g):
  del beta
  return ops.linear_attention(q, k, v, log_decay=g, impl="chunked")


def _inputs(t, dtype):
  keys = jax.random.split(jax.random.key(0), 5)
  q, k, v = (jax.random.normal(keys[i], (B, t, H, D), jnp.float32) for i in range(3))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  beta = jax.nn.sigmoid(jax.random.normal(keys[3], (B, t, H)))
  g = jax.nn.log_sigmoid(jax.random.normal(keys[4], (B, t, H, D)) + 4.0) / 16
  return tuple(a.astype(dtype) for a in (q, k, v, beta, g))


def run(args):
  rows = []
  impls = {"delta_net": delta_net, "gated_delta_net": gated_delta_net, "gla": gla}
  for t in (t for t in LENGTHS if t <= args.max_len):
    inputs = _inputs(t, jnp.dtype(args.dtype))
    row = {"T": t}
    for name, f in impls.items():
      row[f"{name}_fwd_s"] = common.time_fn(jax.jit(f), *inputs, repeats=args.repeats)
      grad = common.fwd_bwd(f)
      row[f"{name}_fwdbwd_s"] = common.time_fn(grad, *inputs, repeats=args.repeats)
      mem = common.peak_bytes(grad, *inputs)
      row[f"{name}_fwdbwd_MiB"] = None if mem is None else mem / 2 ** 20
    row["delta/gla"] = row["delta_net_fwdbwd_s"] / row["gla_fwdbwd_s"]
    rows.append(row)
    print(row, flush=True)
  return rows
