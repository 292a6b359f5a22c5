"""LightNet (additive recurrence) forward+backward: causal beside linear attention and GLA-shaped core calls,
non-causal on 2-D grids beside softmax attention.

Causal: B=1, H=8, K=V=64, fp32, T = 1024.. up to --max_len (and LIGHTNET_CAUSAL_MAX below it by default on CPU);
"linear_attn" is the core with no decay, "gla" the core with a per-key-channel log-decay of the same shape.
Non-causal: grids n x n of tokens, H=8, K=V=64, beside jax.nn.dot_product_attention up to SOFTMAX_GRID_MAX.
Median seconds of a jitted value-and-grad of sum(o) (experiments/benchmarks/common.py), and XLA's planned peak.
"""
import os

import jax
import jax.numpy as jnp

from experiments.benchmarks import common
from mixers.ops.lightnet import lightnet
from mixers.ops.recurrence import gated_linear_recurrence

B, H, D = 1, 8, 64
LENGTHS = (1024, 4096, 16384, 65536)
GRIDS = (32, 64, 128, 256)
# Caps so that the suite finishes in a few minutes on a small shared CPU; raise them on an accelerator.
CAUSAL_MAX = int(os.environ.get("LIGHTNET_CAUSAL_MAX", 16384 if jax.default_backend() == "cpu" else 65536))
GRID_MAX = int(os.environ.get("LIGHTNET_GRID_MAX", 128 if jax.default_backend() == "cpu" else 256))
SOFTMAX_GRID_MAX = int(os.environ.get("LIGHTNET_SOFTMAX_GRID_MAX", 64 if jax.default_backend() == "cpu" else 128))


def lightnet_causal(q, k, v):
  return lightnet(q, k, v, causal=True)


def linear_attn(q, k, v):
  return gated_linear_recurrence(q, k, v, scale=D ** -0.5)[0]


def gla(q, k, v, g):
  return gated_linear_recurrence(q, k, v, g, scale=D ** -0.5)[0]


def lightnet_grid(q, k, v):
  return lightnet(q, k, v, causal=False)


def softmax_grid(q, k, v):
  flat = lambda a: a.reshape(a.shape[0], -1, *a.shape[-2:])
  return jax.nn.dot_product_attention(flat(q), flat(k), flat(v))


def _measure(row, name, f, args, repeats):
  grad = common.fwd_bwd(f)
  row[f"{name}_s"] = common.time_fn(grad, *args, repeats=repeats)
  mem = common.peak_bytes(grad, *args)
  row[f"{name}_MiB"] = None if mem is None else mem / 2 ** 20


def _inputs(shape, n=3):
  return [jax.random.normal(jax.random.key(i), shape, jnp.float32) for i in range(n)]


def run(args):
  rows = []
  repeats = getattr(args, "repeats", 3)
  max_len = min(getattr(args, "max_len", 65536), CAUSAL_MAX)
  for t in (t for t in LENGTHS if t <= max_len):
    q, k, v = _inputs((B, t, H, D))
    g = -jax.nn.softplus(_inputs((B, t, H, D), 4)[3])  # per-key-channel log-decay, as GLA's gate
    row = {"case": "causal", "tokens": t}
    _measure(row, "lightnet", lightnet_causal, (q, k, v), repeats)
    _measure(row, "linear_attn", linear_attn, (q, k, v), repeats)
    _measure(row, "gla", gla, (q, k, v, g), repeats)
    row["lightnet/gla"] = row["lightnet_s"] / row["gla_s"]
    row["us/token"] = 1e6 * row["lightnet_s"] / t
    rows.append(row)
    print(row, flush=True)
  for n in (n for n in GRIDS if n <= GRID_MAX):
    q, k, v = _inputs((B, n, n, H, D))
    row = {"case": f"grid {n}x{n}", "tokens": n * n}
    _measure(row, "lightnet", lightnet_grid, (q, k, v), repeats)
    row["us/token"] = 1e6 * row["lightnet_s"] / (n * n)
    if n <= SOFTMAX_GRID_MAX:
      _measure(row, "softmax", softmax_grid, (q, k, v), repeats)
      row["softmax/lightnet"] = row["softmax_s"] / row["lightnet_s"]
    rows.append(row)
    print(row, flush=True)
  return rows
