"""Token-by-token form of the gated linear recurrence (`lax.scan`), and its single step (the decode step).

  S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = scale q_t^T S_t   (exclusive: scale q_t^T diag(exp(g_t)) S_{t-1}).
A reset at t (a packed segment starts there) replaces S_{t-1} by zeros.
"""
import jax
import jax.numpy as jnp

from mixers.ops.recurrence import shapes


def step(q, k, v, state, log_decay=None, *, scale=1.0, exclusive=False, reset=None):
  """One token: q, k `[B,H,K]`, v `[B,H,V]`, state `[B,H,K,V]`, log_decay None | `[B,H]` | `[B,H,K]`, reset None or
  bool `[B]` (start from zeros)."""
  dtype = state.dtype
  q, k, v = (a.astype(dtype) for a in (q, k, v))
  if reset is not None:
    state = jnp.where(reset[:, None, None, None], jnp.zeros_like(state), state)
  if log_decay is not None:
    decay = jnp.exp(log_decay.astype(dtype))
    state = state * (decay[..., None, None] if decay.ndim == 2 else decay[..., :, None])
  new_state = state + k[..., :, None] * v[..., None, :]
  o = scale * jnp.einsum("bhk,bhkv->bhv", q, state if exclusive else new_state)
  return o, new_state


def recurrence(q, k, v, log_decay=None, *, scale=1.0, initial_state=None, exclusive=False, resets=None):
  """(o `[B,T,H,V]`, final state `[B,H,K,V]`) by scanning over time; resets None or bool `[B,T]`."""
  b, _, h, dk = q.shape
  dtype = shapes.compute_dtype(q, k, v)
  state = (jnp.zeros((b, h, dk, v.shape[-1]), dtype) if initial_state is None else initial_state.astype(dtype))
  xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v))
  g = None if log_decay is None else jnp.moveaxis(log_decay, 1, 0)
  r = None if resets is None else jnp.moveaxis(resets, 1, 0)

  def body(s, x):
    (q_t, k_t, v_t), g_t, r_t = x
    o, s = step(q_t, k_t, v_t, s, g_t, scale=scale, exclusive=exclusive, reset=r_t)
    return s, o

  state, o = jax.lax.scan(body, state, (xs, g, r))
  return jnp.moveaxis(o, 0, 1).astype(shapes.output_dtype(q, k, v)), state
