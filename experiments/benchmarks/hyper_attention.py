"""HyperAttention vs exact softmax attention (`ops.attention`): time, memory and error vs T, causal and non-causal.

B=1, H=4, D=Dv=64, fp32 (or --dtype); HyperAttention with blocks of 256 keys, 256 sampled keys, exact parts of at
most 256 keys and 7 hash bits (`SETTINGS`). Median seconds of a forward and of a forward+backward (gradients of
the sum of the outputs), the peak bytes XLA plans for the forward+backward, and the forward's error against exact
attention: relative RMS (`rel_error`, against the exact output, whose norm is small where attention is diffuse)
and RMS over the RMS of v (`err_over_v`, the scale of the paper's bound). `approximate` is False where every
part of the computation has at most min_seq_len keys (T <= min_seq_len, causal T <= 2 min_seq_len): there
HyperAttention is dense softmax attention written out (not `jax.nn.dot_product_attention`).

The inputs have structure for the hash to find: queries and keys are noisy copies of 64 random directions (each
token picks one for its query and one for its key), scaled so a key of the query's direction scores ~8 above the
rest: most of each row's softmax mass sits on the ~T/64 keys that share its query's direction. After the table,
the crossover: the smallest T, among the approximate rows, at which HyperAttention's forward+backward is faster
than softmax attention's.
"""
import jax
import jax.numpy as jnp

from experiments.benchmarks import common
from mixers import ops

B, H, D = 1, 4, 64
LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
SETTINGS = dict(block_size=256, sample_size=256, min_seq_len=256, lsh_num_projs=7)
CLUSTERS = 64


def clustered_inputs(t, dtype, seed=0):
  """q, k, v `[B,t,H,D]`: q and k near one of CLUSTERS random directions (scaled so matching logits are ~8 above
  the rest), v standard normal."""
  keys = jax.random.split(jax.random.key(seed), 6)
  centers = jax.random.normal(keys[0], (CLUSTERS, H, D))
  centers = 8 ** 0.5 * D ** 0.25 * centers / jnp.linalg.norm(centers, axis=-1, keepdims=True)
  pick_q, pick_k = (jax.random.randint(k, (B, t), 0, CLUSTERS) for k in keys[1:3])
  noise = lambda k: 0.3 * jax.random.normal(k, (B, t, H, D))
  q, k = centers[pick_q] + noise(keys[3]), centers[pick_k] + noise(keys[4])
  v = jax.random.normal(keys[5], (B, t, H, D))
  return tuple(a.astype(dtype) for a in (q, k, v))


def rms(a):
  return float(jnp.sqrt(jnp.mean(a.astype(jnp.float32) ** 2)))


def rel_rms(a, b):
  return rms(a.astype(jnp.float32) - b) / rms(b)


def crossover(rows, causal):
  """Smallest approximate T whose HyperAttention forward+backward beats softmax attention's (None: no such T)."""
  faster = [r["T"] for r in rows if r["causal"] == causal and r["approximate"]
            and r["hyper_fwdbwd_s"] < r["softmax_fwdbwd_s"]]
  return min(faster) if faster else None


def run(args):
  rows = []
  dtype = jnp.dtype(args.dtype)
  for causal in (False, True):
    impls = {"softmax": lambda q, k, v, c=causal: ops.attention(q, k, v, causal=c),
             "hyper": lambda q, k, v, c=causal: ops.hyper_attention(q, k, v, causal=c, **SETTINGS)}
    for t in (t for t in LENGTHS if t <= args.max_len):
      q, k, v = clustered_inputs(t, dtype)
      row = {"T": t, "causal": causal, "approximate": t > SETTINGS["min_seq_len"] * (2 if causal else 1)}
      outs = {}
      for name, f in impls.items():
        fwd = jax.jit(f)
        outs[name] = fwd(q, k, v)
        row[f"{name}_fwd_s"] = common.time_fn(fwd, q, k, v, repeats=args.repeats)
        grad = common.fwd_bwd(f)
        row[f"{name}_fwdbwd_s"] = common.time_fn(grad, q, k, v, repeats=args.repeats)
        mem = common.peak_bytes(grad, q, k, v)
        row[f"{name}_fwdbwd_MiB"] = None if mem is None else mem / 2 ** 20
      row["softmax/hyper_fwd"] = row["softmax_fwd_s"] / row["hyper_fwd_s"]
      row["softmax/hyper_fwdbwd"] = row["softmax_fwdbwd_s"] / row["hyper_fwdbwd_s"]
      row["rel_error"] = rel_rms(outs["hyper"], outs["softmax"])
      row["err_over_v"] = rms(outs["hyper"].astype(jnp.float32) - outs["softmax"]) / rms(v)
      rows.append(row)
      print(row, flush=True)
  for causal in (False, True):
    cross = crossover(rows, causal)
    largest = max((r["T"] for r in rows), default=None)
    text = f"T = {cross}" if cross is not None else f"none up to T = {largest}"
    print(f"hyper_attention {'causal' if causal else 'non-causal'}: approximate forward+backward faster than softmax "
          f"from {text}")
  return rows
