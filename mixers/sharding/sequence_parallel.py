"""Sequence parallelism: an op's `[B,T,...]` inputs and outputs split along T over a mesh axis.

The ops are written on `mixers.ops.sequence`'s primitives and declare their time arguments there, so one
generic wrapper serves them all: pad T to a multiple of the axis size, `jax.shard_map` over that axis (batch
and heads keep their own sharding), call the op. Slices exchange states, never activations.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

from jax.sharding import Mesh

from mixers.ops import sequence


def supported_ops() -> tuple[str, ...]:
  """Names of the ops that declare time arguments (and so run sequence-parallel)."""
  return sequence.declared_ops()


def sequence_parallel(op: Callable, mesh: Mesh, axis: str = sequence.SEQUENCE_AXIS) -> Callable:
  """`op` (an op of `supported_ops()`, or a `functools.partial` of one) with its time arguments split along
  mesh axis `axis`. Any T works: a T that the axis size does not divide is padded at the end, which changes
  no real token's output nor the final state. Results equal the single-device op's.
  """
  if axis not in mesh.shape:
    raise ValueError(f"axis {axis!r} is not a mesh axis; the mesh has {dict(mesh.shape)}")
  if sequence.time_args_of(op) is None:
    raise ValueError(f"sequence_parallel has no form for op {getattr(op, '__name__', op)!r}; "
                     f"supported: {list(supported_ops())}")
  run = functools.partial(sequence.split_time, op, mesh, axis)
  return functools.wraps(op)(run) if not isinstance(op, functools.partial) else run


active_sequence_mesh = sequence.active_sequence_mesh

