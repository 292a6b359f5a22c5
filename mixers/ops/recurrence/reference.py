"""Materialised form of the gated linear recurrence: the T x T mixing matrix applied to the values.

  M_ts = scale * sum_i q_ti k_si exp(G_ti - G_si) for s <= t (s < t if exclusive), G = cumsum(g) over time;
  o = M v + scale * q diag(exp(G)) S_0;  S_T = diag(exp(G_T)) S_0 + sum_s diag(exp(G_T - G_s)) k_s v_s^T.
With resets (packed segments), pairs in different segments get 0, S_0 reaches the first segment only and S_T
holds the last segment's writes. Quadratic in T: the oracle the other forms are tested against, and what plots show.
"""
import jax.numpy as jnp

from mixers.ops.recurrence import shapes


def cumulative_decay(log_decay, shape):
  """G `[B,T,H,K]` (broadcast over K for scalar decays), inclusive cumulative sum of the log-decay."""
  if log_decay is None:
    return jnp.zeros(shape, jnp.float32)
  g = log_decay if log_decay.ndim == 4 else log_decay[..., None]
  return jnp.broadcast_to(jnp.cumsum(g, axis=1), shape)


def decay_weights(log_decay, shape, *, causal=True, exclusive=False, dtype=jnp.float32):
  """w `[B,H,T,T,K]`: exp(G_t - G_s) below the diagonal; non-causal also exp(G_s - G_t) above it."""
  cum = cumulative_decay(log_decay, shape).astype(dtype)
  cum = jnp.moveaxis(cum, 2, 1)  # [B,H,T,K]
  diff = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # G_t - G_s
  t = jnp.arange(shape[1])
  if causal:
    keep = (t[None, :] < t[:, None]) if exclusive else (t[None, :] <= t[:, None])
    return jnp.exp(jnp.where(keep[None, None, :, :, None], diff, -jnp.inf))
  return jnp.exp(-jnp.abs(diff))


def segment_index(resets):
  """`[B,T]` int: which segment of its row each token is in (the count of resets up to it)."""
  return jnp.cumsum(resets.astype(jnp.int32), axis=1)


def chunk_segment_index(resets, chunk):
  """`[B,N,C]` int32: r_t, the segment starts counted inside t's chunk up to t (0 before the chunk's first start),
  for resets bool `[B,T]` cut into N = ceil(T / C) chunks of C tokens (padding past T starts nothing)."""
  b, t = resets.shape
  r = jnp.pad(resets.astype(jnp.int32), ((0, 0), (0, -t % chunk)))
  return jnp.cumsum(r.reshape(b, -1, chunk), axis=-1)


def same_segment(resets):
  """`[B,1,T,T]` bool: tokens t and s are in one segment."""
  seg = segment_index(resets)
  return (seg[:, :, None] == seg[:, None, :])[:, None]


def mixing_matrix(q, k, log_decay=None, *, scale=1.0, causal=True, exclusive=False, resets=None):
  """M `[B,H,T,T]` with o = M v (per batch and head); resets None or bool `[B,T]` (segment starts)."""
  dtype = shapes.compute_dtype(q, k)
  w = decay_weights(log_decay, q.shape, causal=causal, exclusive=exclusive, dtype=dtype)
  m = scale * jnp.einsum("bthi,bshi,bhtsi->bhts", q.astype(dtype), k.astype(dtype), w)
  return m if resets is None else jnp.where(same_segment(resets), m, 0)


def recurrence(q, k, v, log_decay=None, *, scale=1.0, initial_state=None, exclusive=False, resets=None):
  """(o `[B,T,H,V]`, final state `[B,H,K,V]`) from the materialised matrix; resets None or bool `[B,T]`."""
  dtype = shapes.compute_dtype(q, k, v)
  m = mixing_matrix(q, k, log_decay, scale=scale, exclusive=exclusive, resets=resets)
  o = jnp.einsum("bhts,bshv->bthv", m, v.astype(dtype))
  cum = cumulative_decay(log_decay, q.shape).astype(dtype)
  tail = jnp.exp(cum[:, -1:] - cum)  # decay from each s to the end, [B,T,H,K]
  first, last = 1, 1
  if resets is not None:
    seg = segment_index(resets)[:, :, None, None]
    tail = tail * (seg == seg[:, -1:])
    first, last = (seg == 0), (seg[:, -1, :, 0] == 0)[..., None, None]
  final = jnp.einsum("bshk,bshv->bhkv", k.astype(dtype) * tail, v.astype(dtype))
  if initial_state is not None:
    s0 = initial_state.astype(dtype)
    q_in = q.astype(dtype) * jnp.exp(cum) * first
    o = o + scale * jnp.einsum("bthk,bhkv->bthv", q_in, s0)
    final = final + jnp.exp(cum[:, -1])[..., None] * s0 * last
  return o.astype(shapes.output_dtype(q, k, v)), final
