"""Sequence parallelism: bytes communicated per step (from the compiled HLO) and the longest sequence that fits.

Run with simulated devices, e.g.
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/benchmark.py --suite sequence_parallel
One layer of causal linear attention with per-key-channel decay (GLA-like), forward + backward, batch 1,
split over a `sequence` axis of all devices. Ring attention, for comparison, moves every device's K and V
blocks around the ring in the forward pass and again (with their gradients) in the backward pass:
  2 * (P-1)/P * T * H * (K+V) * bytes per layer and device.
"""
import argparse

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.benchmarks import common
from mixers import ops
from mixers.sharding import make_mesh, sequence_parallel
from mixers.sharding.hlo import collective_bytes

HEADS, KEY, VALUE = 16, 64, 64


def _loss(la):
  return lambda q, k, v, g: jnp.sum(la(q, k, v, log_decay=g, chunk_size=64, impl="chunked").astype(jnp.float32))


def _args(t, dtype, sharding=None):
  shapes = ((1, t, HEADS, KEY), (1, t, HEADS, KEY), (1, t, HEADS, VALUE), (1, t, HEADS, KEY))
  return [jax.ShapeDtypeStruct(s, dtype if i < 3 else jnp.float32, sharding=sharding) for i, s in enumerate(shapes)]


def _compiled(t, dtype, mesh=None):
  la = ops.linear_attention
  sharding = None
  if mesh is not None:
    la = sequence_parallel(la, mesh)
    sharding = NamedSharding(mesh, P(None, "sequence"))
  step = jax.jit(jax.grad(_loss(la), argnums=(0, 1, 2, 3)))
  return step.lower(*_args(t, dtype, sharding)).compile()


def _peak(compiled):
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def _largest_fit(budget, dtype, mesh, start, stop):
  """Largest power-of-two T in [start, stop] whose per-device peak stays within budget (None if none)."""
  best, t = None, start
  while t <= stop:
    if _peak(_compiled(t, dtype, mesh)) > budget:
      break
    best, t = t, t * 2
  return best


def run(args):
  parser = argparse.ArgumentParser()
  parser.add_argument("--lengths", default="8192,65536,262144,1048576")
  parser.add_argument("--budget_gib", type=float, default=1.0, help="per-device memory for the fit search")
  parser.add_argument("--max_length", type=int, default=1 << 24)
  opts, _ = parser.parse_known_args(getattr(args, "rest", None) or [])
  devices = jax.device_count()
  mesh = make_mesh({"sequence": devices})
  dtype, item = jnp.bfloat16, 2
  rows = []
  for t in (int(x) for x in opts.lengths.split(",")):
    sp_bytes = collective_bytes(_compiled(t, dtype, mesh).as_text())
    ring = 2 * (devices - 1) / devices * t * HEADS * (KEY + VALUE) * item
    rows.append({"what": "bytes/step/device", "T": t, "devices": devices, "sequence_parallel": sp_bytes,
                 "ring_attention": int(ring), "ratio": round(ring / max(sp_bytes, 1), 1)})
  budget = int(opts.budget_gib * 2 ** 30)
  one = _largest_fit(budget, dtype, None, 1024, opts.max_length)
  many = _largest_fit(budget, dtype, mesh, 1024 * devices, opts.max_length)
  rows.append({"what": f"largest T, fwd+bwd, {opts.budget_gib} GiB/device", "T": None, "devices": devices,
               "sequence_parallel": many, "ring_attention": None, "ratio": None, "one_device": one})
  return rows


if __name__ == "__main__":
  common.print_table(run(argparse.Namespace(rest=None)), "sequence parallelism")
