"""The gated linear recurrence, the one core most mixers here are instances of.

  S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = scale * q_t^T S_t

q, k `[B,T,H,K]`, v `[B,T,H,V]`, g (log-decay, <= 0) None | `[H]` | `[B,T,H]` | `[B,T,H,K]`, states
`[B,H,K,V]` accumulated in float32. With `exclusive=True` a token reads the state before its own write:
o_t = scale * q_t^T diag(exp(g_t)) S_{t-1}. Forms (`impl`): "reference" (materialised T x T matrix),
"recurrent" (token loop), "chunked" (sub-quadratic pure JAX), "pallas" (kernels); "auto" picks pallas where a
kernel supports the backend and shape, else chunked.
"""
from mixers.ops import checks
from mixers.ops.recurrence import chunked, recurrent, reference, shapes
from mixers.ops.recurrence.reference import mixing_matrix
from mixers.ops.recurrence.recurrent import step

IMPLS = ("auto", "chunked", "recurrent", "reference", "pallas")


def _pallas_supported(q, k, v, log_decay, chunk_size, exclusive):
  if exclusive:
    return False
  from mixers import kernels  # pylint: disable=import-outside-toplevel
  return kernels.supports(q, k, v, log_decay, chunk_size)


def gated_linear_recurrence(q, k, v, log_decay=None, *, scale=1.0, initial_state=None, exclusive=False,
                            chunk_size=64, impl="auto"):
  """Returns (o `[B,T,H,V]` in the inputs' dtype, final state `[B,H,K,V]` in float32 or wider)."""
  checks.check_choice("impl", impl, IMPLS)
  checks.check_positive_int("chunk_size", chunk_size)
  shapes.check_qkv(q, k, v)
  log_decay = shapes.normalize_log_decay(log_decay, q)
  shapes.check_state("initial_state", initial_state, q, v)
  if impl == "auto":
    impl = "pallas" if _pallas_supported(q, k, v, log_decay, chunk_size, exclusive) else "chunked"
  if impl == "reference":
    return reference.recurrence(q, k, v, log_decay, scale=scale, initial_state=initial_state, exclusive=exclusive)
  if impl == "recurrent":
    return recurrent.recurrence(q, k, v, log_decay, scale=scale, initial_state=initial_state, exclusive=exclusive)
  if impl == "pallas":
    if exclusive:
      raise ValueError("impl='pallas' does not support exclusive=True; use impl='chunked'")
    from mixers import kernels  # pylint: disable=import-outside-toplevel
    return kernels.chunked_recurrence(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                      chunk_size=chunk_size)
  return chunked.recurrence(q, k, v, log_decay, scale=scale, initial_state=initial_state, exclusive=exclusive,
                            chunk_size=chunk_size)


__all__ = ["gated_linear_recurrence", "mixing_matrix", "step", "IMPLS"]
