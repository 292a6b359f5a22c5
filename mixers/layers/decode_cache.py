"""Decode caches: what a causal layer carries from one `decode=True` call to the next, in the `cache` collection.

The protocol: `layer.init(key, x_full, decode=True)["cache"]` makes an empty cache for inputs shaped like x_full
(its batch size is the one to decode with; attention's KV cache holds x_full's length), then each
`layer.apply({**variables, "cache": cache}, x_chunk, decode=True, mutable=["cache"])` reads a chunk of one or more
new tokens and returns `(y_chunk, {"cache": updated})`; the chunks' outputs equal the full forward's.

Every carried value goes through `cached_recurrence`: a recurrent state (any pytree: an SSM state, (S, z), a KV
cache), the position of the next token (`decode_positions`) and a short conv's window (`ShortConv`). A layer whose
cache holds a bounded number of positions (attention's KV cache, M2's history, cosFormer's positions) keeps that
bound in `cache[..]["capacity"]` and checks every chunk against it with `within_capacity`: past it, a concrete
position raises and a traced one (under jit) turns the outputs into NaN, never silently wrong numbers.
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixers.ops.recurrence.reference import segment_index as index_of_starts
from mixers.ops.sequence import segment_starts


def check_decode(module: nn.Module, decode: bool):
  """ValueError when decoding is asked of a non-causal module."""
  if decode and not module.causal:
    raise ValueError(f"decode=True needs causal=True: a non-causal {type(module).__name__} cannot decode")


def _check_batch(module, name, carry, zeros):
  """ValueError when the cache was made for another batch size than the one being decoded."""
  expected = jax.eval_shape(zeros)
  for have, want in zip(jax.tree.leaves(carry), jax.tree.leaves(expected)):
    if np.ndim(have) and want.ndim and np.shape(have)[0] != want.shape[0]:
      raise ValueError(f"{type(module).__name__}: decoding a batch of {want.shape[0]} sequences with a cache made "
                       f"for a batch of {np.shape(have)[0]}; make the cache with init(..., decode=True) on an input "
                       f"of the batch size you decode")


def cached_recurrence(module: nn.Module, run: Callable, zeros: Callable, *, decode: bool, name: str = "state"):
  """y from `run(carry) -> (y, new_carry)`, with the carry kept in `cache[name]` when decoding.

  `zeros()` makes the carry at the start of a sequence (any pytree; leaves with a batch axis have it first). Outside
  decode mode, and in the decode call that creates the cache (inside `init`), `run` gets None (the start of the
  sequence) and nothing is kept. A cache made for another batch size is a ValueError naming both sizes.
  """
  if not decode:
    return run(None)[0]
  existed = module.has_variable("cache", name)
  carry = module.variable("cache", name, zeros)
  if not existed:
    return run(None)[0]
  _check_batch(module, name, carry.value, zeros)
  y, carry.value = run(carry.value)
  return y


def decode_positions(module: nn.Module, batch: int, length: int, *, decode: bool):
  """Token positions `[B,T]`: 0..T-1, or continuing from `cache['position']` when decoding."""
  steps = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

  def advance(start):
    start = jnp.zeros((), jnp.int32) if start is None else start
    return steps + start, start + length

  return cached_recurrence(module, advance, lambda: jnp.zeros((), jnp.int32), decode=decode, name="position")


def segment_index(segment_ids):
  """int32 `[B,T]`: which segment of `segment_ids` `[B,T]` (a run of equal ids) each token is in, 0 for the first
  one of each row (`reference.segment_index` of the segment starts)."""
  return index_of_starts(segment_starts(segment_ids))


def segment_positions(module: nn.Module, segment_ids, batch: int, length: int, *, decode: bool):
  """(positions `[B,T]` as `decode_positions`, first `[B,T]`: the position of the first token of each token's
  segment); `positions - first` counts from each segment's first token.

  segment_ids `[B,T]` ints (packed sequences) or None (one segment). When decoding, the chunk's first segment
  continues the cache's last one and `cache['segment_start']` `[B]` keeps the start of each row's last segment, so
  later chunks continue it.
  """
  pos = decode_positions(module, batch, length, decode=decode)
  if segment_ids is None:
    local, continues = jnp.zeros((batch, length), jnp.int32), jnp.ones((batch, length), bool)
  else:
    starts = segment_starts(segment_ids)
    local = jax.lax.cummax(jnp.where(starts, jnp.arange(length, dtype=jnp.int32), 0), axis=1)
    continues = index_of_starts(starts) == 0

  def advance(previous):
    previous = jnp.zeros((batch,), jnp.int32) if previous is None else previous
    first = jnp.where(continues, previous[:, None], pos[:, :1] + local)
    return first, first[:, -1]

  first = cached_recurrence(module, advance, lambda: jnp.zeros((batch,), jnp.int32), decode=decode,
                            name="segment_start")
  return pos, first


def within_capacity(module: nn.Module, end, capacity: int, *, decode: bool, what: str):
  """True (a bool scalar) when tokens up to position `end` (exclusive) fit a cache of `capacity` positions.

  When decoding, records `cache['capacity']`. A concrete `end` past the capacity raises ValueError naming `what`
  (the setting that sizes the cache); a traced one (under jit) gives False, for `poison` to turn outputs into NaN.
  """
  if decode:
    module.variable("cache", "capacity", lambda: jnp.asarray(capacity, jnp.int32))
  if not isinstance(end, jax.core.Tracer) and int(end) > capacity:
    raise ValueError(f"{type(module).__name__}: decoding up to position {int(end)} past the cache's capacity of "
                     f"{capacity} positions ({what})")
  return jnp.asarray(end) <= capacity


def block_aligned(module: nn.Module, start, block_size: int):
  """True (a bool scalar) when a decode chunk starting at position `start` starts a block of `block_size` tokens.

  Block-causal decoding reads whole blocks from the cache: each chunk starts at a block boundary (so every chunk but
  the last is a whole number of blocks). A concrete misaligned `start` raises ValueError; a traced one (under jit)
  gives False, for `poison`.
  """
  if not isinstance(start, jax.core.Tracer) and int(start) % block_size:
    raise ValueError(f"{type(module).__name__}: with block_size={block_size} each decode chunk must start at a block "
                     f"boundary (a multiple of {block_size}), got a chunk starting at position {int(start)}: every "
                     f"chunk but the last must be a whole number of blocks")
  return jnp.asarray(start) % block_size == 0


def poison(y, ok):
  """y where `ok`, NaN elsewhere (ok a bool scalar from `within_capacity`)."""
  return jnp.where(ok, y, jnp.asarray(jnp.nan, y.dtype))


def decode_capacity(cache):
  """The fewest positions any bounded cache in `cache` (a model's or a layer's `cache` collection) holds, or None.

  Read it after `init(..., decode=True)` to check a decoding budget before decoding.
  """
  flat = jax.tree_util.tree_flatten_with_path(cache)[0]
  caps = [int(np.min(np.asarray(v))) for path, v in flat if getattr(path[-1], "key", None) == "capacity"]
  return min(caps) if caps else None
