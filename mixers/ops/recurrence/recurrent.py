"""Token-by-token form of the gated linear recurrence (`lax.scan`), and its single step (the decode step).

  S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = scale q_t^T S_t   (exclusive: scale q_t^T diag(exp(g_t)) S_{t-1}).
"""
import jax
import jax.numpy as jnp

from mixers.ops.recurrence import shapes


def step(q, k, v, state, log_decay=None, *, scale=1.0, exclusive=False):
  """One token: q, k `[B,H,K]`, v `[B,H,V]`, state `[B,H,K,V]`, log_decay None | `[B,H]` | `[B,H,K]`."""
  dtype = state.dtype
  q, k, v = (a.astype(dtype) for a in (q, k, v))
  if log_decay is not None:
    decay = jnp.exp(log_decay.astype(dtype))
    state = state * (decay[..., None, None] if decay.ndim == 2 else decay[..., :, None])
  new_state = state + k[..., :, None] * v[..., None, :]
  o = scale * jnp.einsum("bhk,bhkv->bhv", q, state if exclusive else new_state)
  return o, new_state


def recurrence(q, k, v, log_decay=None, *, scale=1.0, initial_state=None, exclusive=False):
  """(o `[B,T,H,V]`, final state `[B,H,K,V]`) by scanning over time."""
  b, _, h, dk = q.shape
  dtype = shapes.compute_dtype(q, k, v)
  state = (jnp.zeros((b, h, dk, v.shape[-1]), dtype) if initial_state is None else initial_state.astype(dtype))
  xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v))
  if log_decay is not None:
    xs += (jnp.moveaxis(log_decay, 1, 0),)

  def body(s, x):
    g = x[3] if len(x) == 4 else None
    o, s = step(x[0], x[1], x[2], s, g, scale=scale, exclusive=exclusive)
    return s, o

  state, o = jax.lax.scan(body, state, xs)
  return jnp.moveaxis(o, 0, 1).astype(shapes.output_dtype(q, k, v)), state
