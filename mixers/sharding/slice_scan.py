"""The gated linear recurrence over a sequence split across devices (runs inside `jax.shard_map`).

Device p holds slice p of the time axis. With S_p its slice's final state from a zero start and
D_p = exp(sum of g over the slice) its total decay, the state entering slice p is

  S_in_p = D_{p-1} S_in_{p-1} + S_{p-1},   S_in_0 = initial state (or 0),

and each output needs the correction o_t += scale * (q_t * exp(c_t))^T S_in_p, with c_t the inclusive
cumulative log-decay of the slice up to t. Only the [B,H,K,V] states and [B,H,K] decays cross devices
(one all-gather); the prefix combine over P slices is repeated on every device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mixers.ops.recurrence import gated_linear_recurrence


def _decay_shape(g):
  """Log-decay [B,L,H] or [B,L,H,K] -> broadcastable against [B,L,H,K]."""
  return g[..., None] if g.ndim == 3 else g


def zero_state(q, v):
  """Zeros `[B,H,K,V]` varying over the same manual mesh axes as q and v (a valid scan carry inside
  shard_map)."""
  dtype = jnp.promote_types(jnp.result_type(q, v), jnp.float32)
  zeros = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), dtype)
  varying = lambda x: jax.typeof(x).manual_axis_type.varying
  axes = tuple(sorted(varying(q) | varying(v)))
  return jax.lax.pcast(zeros, axes, to="varying") if axes else zeros


def combine_states(states, log_totals, initial_state=None):
  """Prefix combine of per-slice states.

  states `[P,B,H,K,V]`, log_totals None | `[P,B,H,1|K]` (total log-decay of each slice, per key channel).
  Returns (incoming `[P,B,H,K,V]`: the state entering each slice, final `[B,H,K,V]`).
  """
  start = jnp.zeros_like(states[0]) if initial_state is None else initial_state.astype(states.dtype)

  def step(s_in, x):
    s_p, g_p = x
    s_out = s_p + (s_in if g_p is None else jnp.exp(g_p)[..., None] * s_in)
    return s_out, s_in

  final, incoming = jax.lax.scan(step, start, (states, log_totals))
  return incoming, final


def slice_scan(q, k, v, log_decay=None, *, axis, scale=1.0, initial_state=None, exclusive=False,
               reverse_order=False, chunk_size=64, impl="auto"):
  """Local slices q, k `[B,L,H,K]`, v `[B,L,H,V]`, log_decay None | `[B,L,H]` | `[B,L,H,K]`.

  Returns (o `[B,L,H,V]` for this slice, final state `[B,H,K,V]` of the whole sequence, the same on
  every device). `reverse_order`: slice p is the (P-1-p)-th of the sequence (device order reversed),
  used for backward scans over a time-reversed sequence.
  """
  o, s_local = gated_linear_recurrence(q, k, v, log_decay, scale=scale, exclusive=exclusive,
                                       initial_state=zero_state(q, v), chunk_size=chunk_size, impl=impl)
  s_local = s_local.astype(jnp.float32) if s_local.dtype != jnp.float64 else s_local
  acc = s_local.dtype
  states = jax.lax.all_gather(s_local, axis, to="invarying")  # [P,B,H,K,V]
  if log_decay is None:
    cum, totals = None, None
  else:
    cum = jnp.cumsum(_decay_shape(log_decay).astype(acc), axis=1)  # [B,L,H,1|K]
    totals = jax.lax.all_gather(cum[:, -1], axis, to="invarying")  # [P,B,H,1|K]
  position = jax.lax.axis_index(axis)
  if reverse_order:
    states = jnp.flip(states, 0)
    totals = None if totals is None else jnp.flip(totals, 0)
    position = states.shape[0] - 1 - position
  incoming, final = combine_states(states, totals, initial_state)
  s_in = incoming[position]
  q_in = q.astype(acc) if cum is None else q.astype(acc) * jnp.exp(cum)
  o = o.astype(acc) + scale * jnp.einsum("blhk,bhkv->blhv", q_in, s_in)
  return o, final


def next_slice_first(x, axis):
  """x `[B,L,...]` -> `[B,1,...]`: the first row of the next device's slice (zeros on the last device)."""
  firsts = jax.lax.all_gather(x[:, 0], axis)  # [P,B,...]
  size = firsts.shape[0]
  position = jax.lax.axis_index(axis)
  row = firsts[jnp.minimum(position + 1, size - 1)]
  return jnp.where(position + 1 < size, row, jnp.zeros_like(row))[:, None]


def previous_slice_last(x, axis):
  """x `[B,L,...]` -> `[B,1,...]`: the last row of the previous device's slice (zeros on the first)."""
  lasts = jax.lax.all_gather(x[:, -1], axis)  # [P,B,...]
  position = jax.lax.axis_index(axis)
  row = lasts[jnp.maximum(position - 1, 0)]
  return jnp.where(position > 0, row, jnp.zeros_like(row))[:, None]


def reverse_strict_scan(q, k, v, log_decay=None, *, axis, scale=1.0, chunk_size=64, impl="auto"):
  """Anti-causal part: o_t = scale * sum_{s>t} q_t^T diag(exp(g_{t+1} + ... + g_s)) k_s v_s^T.

  The forward recurrence run on the time-reversed sequence (exclusive), with the decay shifted by
  one token (h_t = g_{t+1}, the last slice's final h being 0), the shift reaching into the next slice.
  """
  flip = lambda x: jnp.flip(x, axis=1)
  h = None
  if log_decay is not None:
    h = jnp.concatenate([log_decay[:, 1:], next_slice_first(log_decay, axis)], axis=1)
    h = flip(h)
  o, _ = slice_scan(flip(q), flip(k), flip(v), h, axis=axis, scale=scale, exclusive=True,
                    reverse_order=True, chunk_size=chunk_size, impl=impl)
  return flip(o)
