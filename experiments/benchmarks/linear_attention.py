"""Causal linear attention (chunked core) vs a cumsum-of-chunk-states peer and causal softmax attention.

B=1, H=8, K=V=64, fp32; forward and forward+backward median seconds, and the peak bytes XLA plans for a
forward+backward. The peer is the chunked einsum most JAX ports use: chunk states k^T v, prefix sums by
cumsum, then q S_prev plus the masked intra-chunk product.
"""
import jax
import jax.numpy as jnp
from einops import rearrange

from experiments.benchmarks import common
from mixers import ops

B, H, D = 1, 8, 64
LENGTHS = (1024, 4096, 8192, 16384, 65536)
SOFTMAX_MAX = 8192


def cumsum_peer(q, k, v, chunk=64):
  """Chunk states by cumsum: o = scale (q S_prev + mask(q k^T) v) per chunk."""
  scale = q.shape[-1] ** -0.5
  qc, kc, vc = (rearrange(a, "b (n c) h d -> b n h c d", c=chunk) for a in (q, k, v))
  kv = jnp.einsum("bnhck,bnhcv->bnhkv", kc, vc)
  s_prev = jnp.cumsum(kv, axis=1) - kv
  mask = jnp.tril(jnp.ones((chunk, chunk), bool))
  scores = jnp.where(mask, jnp.einsum("bnhck,bnhsk->bnhcs", qc, kc), 0)
  o = jnp.einsum("bnhck,bnhkv->bnhcv", qc, s_prev) + jnp.einsum("bnhcs,bnhsv->bnhcv", scores, vc)
  return rearrange(o * scale, "b n h c d -> b (n c) h d")


def chunked(q, k, v):
  return ops.linear_attention(q, k, v, causal=True, impl="chunked")


def softmax(q, k, v):
  return ops.attention(q, k, v, causal=True)


def run(args):
  rows = []
  lengths = [t for t in LENGTHS if t <= args.max_len]
  impls = {"chunked": chunked, "cumsum_peer": cumsum_peer, "softmax": softmax}
  for t in lengths:
    q, k, v = (jax.random.normal(jax.random.key(i), (B, t, H, D), jnp.float32) for i in range(3))
    row = {"T": t}
    for name, f in impls.items():
      if name == "softmax" and t > SOFTMAX_MAX:
        continue
      row[f"{name}_fwd_s"] = common.time_fn(jax.jit(f), q, k, v, repeats=args.repeats)
      grad = common.fwd_bwd(f)
      row[f"{name}_fwdbwd_s"] = common.time_fn(grad, q, k, v, repeats=args.repeats)
      mem = common.peak_bytes(grad, q, k, v)
      row[f"{name}_fwdbwd_MiB"] = None if mem is None else mem / 2 ** 20
    row["peer/chunked"] = row["cumsum_peer_fwdbwd_s"] / row["chunked_fwdbwd_s"]
    if "softmax_fwdbwd_s" in row:
      row["softmax/chunked"] = row["softmax_fwdbwd_s"] / row["chunked_fwdbwd_s"]
    rows.append(row)
    print(row, flush=True)
  return rows
