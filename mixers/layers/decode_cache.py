"""Decode caches: what a causal layer carries from one `decode=True` call to the next, in the `cache` collection.

Every carried value goes through `cached_recurrence`: a recurrent state (any pytree: an SSM state, (S, z), a KV
cache), the position of the next token (`decode_positions`) and a short conv's window (`ShortConv`).
"""
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp


def check_decode(module: nn.Module, decode: bool):
  """ValueError when decoding is asked of a non-causal module."""
  if decode and not module.causal:
    raise ValueError(f"decode=True needs causal=True: a non-causal {type(module).__name__} cannot decode")


def cached_recurrence(module: nn.Module, run: Callable, zeros: Callable, *, decode: bool, name: str = "state"):
  """y from `run(carry) -> (y, new_carry)`, with the carry kept in `cache[name]` when decoding.

  `zeros()` makes the carry at the start of a sequence (any pytree). Outside decode mode, and in the decode call
  that creates the cache (inside `init`), `run` gets None (the start of the sequence) and nothing is kept.
  """
  if not decode:
    return run(None)[0]
  existed = module.has_variable("cache", name)
  carry = module.variable("cache", name, zeros)
  if not existed:
    return run(None)[0]
  y, carry.value = run(carry.value)
  return y


def decode_positions(module: nn.Module, batch: int, length: int, *, decode: bool):
  """Token positions `[B,T]`: 0..T-1, or continuing from `cache['position']` when decoding."""
  steps = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

  def advance(start):
    start = jnp.zeros((), jnp.int32) if start is None else start
    return steps + start, start + length

  return cached_recurrence(module, advance, lambda: jnp.zeros((), jnp.int32), decode=decode, name="position")
