"""Monarch mixers: long convolutions, the M2 layer, and Monarch vs dense matrix multiplies.

- long_conv (forward): B=1, D=512, causal; impl fft (jnp.fft), monarch (GEMM-only DFT), and the direct
  O(T^2) depthwise convolution (`lax.conv_general_dilated`, what `jnp.convolve` does per channel).
- m2 (forward+backward): the causal MonarchMixer layer at B=1, d_model=512, beside causal softmax
  attention (`jax.nn.dot_product_attention`, H=8, head_dim=64, no projections).
- monarch vs dense (forward): 1024 vectors of width N times an N x N Monarch (blocks of sqrt N) or a
  dense matrix.

Lengths double from 1024 to --max_len; an implementation stops growing once one call takes more than
STOP_S seconds (the next length would take minutes on a small CPU); the rows say where each stopped.
"""
import importlib

import jax
import jax.numpy as jnp

from experiments.benchmarks import common
from mixers.layers.monarch_mixer import MonarchMixer
from mixers.ops.long_conv import long_conv

monarch_ops = importlib.import_module("mixers.ops.monarch")  # the module (mixers.ops.monarch is the function)

B, D = 1, 512
HEADS, HEAD_DIM = 8, 64
STOP_S = 2.0
MONARCH_N = (1024, 4096)
MONARCH_ROWS = 1024


def _lengths(max_len):
  t, out = 1024, []
  while t <= max_len:
    out.append(t)
    t *= 2
  return out


def direct_conv(u, k):
  """Causal depthwise convolution with the full length-T kernel: O(T^2 D)."""
  T = u.shape[1]
  rhs = jnp.flip(k, 0)[:, None, :]  # [T, 1, D] (WIO), flipped: conv is a correlation
  return jax.lax.conv_general_dilated(u, rhs, window_strides=(1,), padding=[(T - 1, 0)],
                                      dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=u.shape[-1])


def _long_conv_rows(args):
  rows, live = [], {"fft": True, "monarch": True, "direct": True}
  fns = {"fft": jax.jit(lambda u, k: long_conv(u, k, impl="fft")),
         "monarch": jax.jit(lambda u, k: long_conv(u, k, impl="monarch")),
         "direct": jax.jit(direct_conv)}
  for t in _lengths(args.max_len):
    u = jax.random.normal(jax.random.key(0), (B, t, D), jnp.float32)
    k = jax.random.normal(jax.random.key(1), (t, D), jnp.float32) / t
    for impl, f in fns.items():
      if not live[impl]:
        continue
      s = common.time_fn(f, u, k, repeats=args.repeats)
      live[impl] = s < STOP_S
      rows.append({"bench": "long_conv fwd", "size": t, "impl": impl, "seconds": s,
                   "ns_per_TD": s / (t * D) * 1e9})
      print(rows[-1], flush=True)
  return rows


def _m2_rows(args):
  rows, live = [], {"m2_fft": True, "m2_monarch": True, "softmax": True}
  layers = {name: MonarchMixer(causal=True, max_len=4096, conv_impl=name[3:]) for name in ("m2_fft", "m2_monarch")}
  params = jax.jit(layers["m2_fft"].init)(jax.random.key(0), jnp.zeros((B, 1024, D)))
  for t in _lengths(args.max_len):
    x = jax.random.normal(jax.random.key(2), (B, t, D), jnp.float32)
    q, k, v = (jax.random.normal(jax.random.key(i), (B, t, HEADS, HEAD_DIM), jnp.float32) for i in range(3))
    cases = {
        "m2_fft": (common.fwd_bwd(lambda p, x: layers["m2_fft"].apply(p, x)), (params, x)),
        "m2_monarch": (common.fwd_bwd(lambda p, x: layers["m2_monarch"].apply(p, x)), (params, x)),
        "softmax": (common.fwd_bwd(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)),
                    (q, k, v)),
    }
    for name, (f, a) in cases.items():
      if not live[name]:
        continue
      s = common.time_fn(f, *a, repeats=args.repeats)
      live[name] = s < STOP_S
      rows.append({"bench": "m2 fwd+bwd", "size": t, "impl": name, "seconds": s, "ns_per_TD": s / (t * D) * 1e9})
      print(rows[-1], flush=True)
  return rows


def _monarch_rows(args):
  rows = []
  for n in MONARCH_N:
    b = int(round(n ** 0.5))
    x = jax.random.normal(jax.random.key(0), (MONARCH_ROWS, n), jnp.float32)
    L, R = (jax.random.normal(jax.random.key(i), (b, b, b), jnp.float32) / b ** 0.5 for i in (1, 2))
    W = jax.random.normal(jax.random.key(3), (n, n), jnp.float32) / n ** 0.5
    dense_s = common.time_fn(jax.jit(lambda x, W: x @ W), x, W, repeats=args.repeats)
    monarch_s = common.time_fn(jax.jit(monarch_ops.monarch), x, L, R, repeats=args.repeats)
    for impl, s in (("dense", dense_s), ("monarch", monarch_s)):
      rows.append({"bench": f"{MONARCH_ROWS} x [N,N] matmul", "size": n, "impl": impl, "seconds": s,
                   "dense/this": dense_s / s})
      print(rows[-1], flush=True)
  return rows


def run(args):
  return _monarch_rows(args) + _long_conv_rows(args) + _m2_rows(args)
