"""The gated linear recurrence, the one core most mixers here are instances of.

  S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = scale * q_t^T S_t

q, k `[B,T,H,K]`, v `[B,T,H,V]`, g (log-decay, <= 0) None | `[H]` | `[B,T,H]` | `[B,T,H,K]`, states
`[B,H,K,V]` accumulated in float32. With `exclusive=True` a token reads the state before its own write:
o_t = scale * q_t^T diag(exp(g_t)) S_{t-1}. `resets` (bool `[B,T]`, packed sequences) restarts the recurrence:
at a reset token S_{t-1} is replaced by zeros, so each segment runs as its own sequence (S_0 reaches the first
segment only; the final state is the last segment's). Forms (`impl`): "reference" (materialised T x T matrix),
"recurrent" (token loop), "chunked" (sub-quadratic pure JAX), "pallas" (kernels); "auto" picks pallas where a
kernel supports the backend and shape, else chunked. Invalid decays (g > 0) raise when concrete and become NaN
under jit (`checks.nonpositive_or_nan`); a chunked form's NaN also reaches the earlier outputs of its chunk.
"""
import jax
import jax.numpy as jnp

from mixers.ops import checks
from mixers.ops.recurrence import chunked, recurrent, reference, shapes
from mixers.ops.recurrence.reference import mixing_matrix
from mixers.ops.recurrence.recurrent import step

IMPLS = ("auto", "chunked", "recurrent", "reference", "pallas")


def _pallas_supported(q, k, v, log_decay, chunk_size, exclusive):
  if exclusive or jax.default_backend() not in ("gpu", "tpu"):
    return False
  from mixers import kernels  # pylint: disable=import-outside-toplevel
  return kernels.supports(q, k, v, log_decay, chunk_size)


def _pallas(q, k, v, log_decay, *, scale, initial_state, chunk_size, resets=None):
  """The kernels need T to be a multiple of the chunk: zero-padded tokens (no segment starts) change neither o nor
  the state."""
  from mixers import kernels  # pylint: disable=import-outside-toplevel
  t = q.shape[1]
  pad = -t % chunk_size
  if pad:
    pad_time = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q, k, v, log_decay, resets = (pad_time(x) for x in (q, k, v, log_decay, resets))
  o, state = kernels.chunked_recurrence(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                        chunk_size=chunk_size, resets=resets)
  return o[:, :t], state


def gated_linear_recurrence(q, k, v, log_decay=None, *, scale=1.0, initial_state=None, exclusive=False,
                            chunk_size=64, impl="auto", resets=None):
  """Returns (o `[B,T,H,V]` in the inputs' dtype, final state `[B,H,K,V]` in float32 or wider)."""
  checks.check_choice("impl", impl, IMPLS)
  if resets is not None:
    checks.check_shape("resets", resets, q.shape[:2], f"bool [B,T] = {tuple(q.shape[:2])}")
    if q.shape[1] == 0:
      resets = None
  checks.check_positive_int("chunk_size", chunk_size)
  shapes.check_qkv(q, k, v)
  log_decay = shapes.normalize_log_decay(log_decay, q)
  shapes.check_state("initial_state", initial_state, q, v)
  if log_decay is not None:
    # Decays are often constants (fixed per-head rates); keep XLA from constant-folding their cumsums.
    log_decay = jax.lax.optimization_barrier(log_decay)
  if impl == "auto":
    supported = _pallas_supported(q, k, v, log_decay, chunk_size, exclusive)
    impl = "pallas" if supported else "chunked"
  kw = dict(scale=scale, initial_state=initial_state, exclusive=exclusive, resets=resets)
  if impl == "reference":
    return reference.recurrence(q, k, v, log_decay, **kw)
  if impl == "recurrent":
    return recurrent.recurrence(q, k, v, log_decay, **kw)
  if impl == "pallas":
    if exclusive:
      raise ValueError("impl='pallas' does not support exclusive=True; use impl='chunked'")
    return _pallas(q, k, v, log_decay, scale=scale, initial_state=initial_state, chunk_size=chunk_size,
                   resets=resets)
  return chunked.recurrence(q, k, v, log_decay, chunk_size=chunk_size, **kw)


__all__ = ["gated_linear_recurrence", "mixing_matrix", "step", "IMPLS"]
