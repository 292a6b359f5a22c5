"""Argument checks that fail fast with the argument's name, its shape and what was expected."""
import jax
import jax.numpy as jnp
import numpy as np


def shape_error(name, x, expected):
  return ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")


def check_rank(name, x, rank, expected):
  if x.ndim != rank:
    raise shape_error(name, x, expected)


def check_shape(name, x, shape, expected):
  """`shape` is a tuple of ints or None (any size)."""
  if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
    raise shape_error(name, x, expected)


def check_positive_int(name, value):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def is_concrete(x):
  return not isinstance(x, jax.core.Tracer)


def check_float(**arrays):
  """Each named array (None passes) must have a floating dtype: integer inputs would be truncated."""
  for name, x in arrays.items():
    if x is not None and not jax.numpy.issubdtype(jax.numpy.result_type(x), jax.numpy.floating):
      raise ValueError(f"{name} must be a floating-point array, got dtype {jax.numpy.result_type(x)}")


def _signed_or_nan(name, x, sign, what):
  """x whose entries must have `sign` (-1: <= 0, 1: >= 0): a concrete violation raises; under jit the violating
  entries become NaN."""
  if x is None:
    return None
  if not is_concrete(x):
    return jax.numpy.where(sign * x < 0, jax.numpy.nan, x)
  values = np.asarray(x)
  if np.any(sign * values < 0):
    worst = float(np.max(values) if sign < 0 else np.min(values))
    raise ValueError(f"{name} must be {'<=' if sign < 0 else '>='} 0{what}, got a "
                     f"{'maximum' if sign < 0 else 'minimum'} of {worst}")
  return x


def nonpositive_or_nan(name, x):
  """x, which must be <= 0: a concrete positive value raises; under jit positive entries become NaN, so the
  outputs that depend on them are NaN rather than silently overflowing. In the chunked forms a NaN at token t
  also reaches the earlier outputs of t's chunk (through the masked intra-chunk matmul), as in every chunked
  implementation; the token loop keeps it to t and later."""
  return _signed_or_nan(name, x, -1, " (a log-space decay)")


def nonnegative_or_nan(name, x):
  """x, which must be >= 0 (step sizes): as `nonpositive_or_nan` with the sign reversed."""
  return _signed_or_nan(name, x, 1, "")


def check_prefix_len(prefix_len, batch, length):
  """prefix_len None | int | int array (a scalar or `[B]`) with values in [0, length]; concrete values are checked.
  Returns it unchanged (a Python int stays one), arrays as jnp arrays."""
  if prefix_len is None:
    return None
  if isinstance(prefix_len, (int, np.integer)) and not isinstance(prefix_len, bool):
    if not 0 <= prefix_len <= length:
      raise ValueError(f"prefix_len must be in [0, T] = [0, {length}], got {prefix_len}")
    return prefix_len
  p = jnp.asarray(prefix_len)
  if not jnp.issubdtype(p.dtype, jnp.integer) or p.shape not in ((), (batch,)):
    raise ValueError(f"prefix_len must be None, an int or an int array [B] = ({batch},), got "
                     f"{p.dtype} of shape {tuple(p.shape)}")
  if is_concrete(p):
    values = np.asarray(p)
    if np.any(values < 0) or np.any(values > length):
      raise ValueError(f"prefix_len must be in [0, T] = [0, {length}], got values from {values.min()} to "
                       f"{values.max()}")
  return p


def check_segment_ids(segment_ids, batch, length):
  """segment_ids None | int array `[B,T]` (packed sequences: a segment is a run of equal ids). Returns it as a jnp
  array, or None."""
  if segment_ids is None:
    return None
  ids = jnp.asarray(segment_ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.shape != (batch, length):
    raise ValueError(f"segment_ids must be an int array [B,T] = {(batch, length)}, got {ids.dtype} of shape "
                     f"{tuple(ids.shape)}")
  return ids
