"""Chunked form of the gated linear recurrence: masked matmuls inside chunks, states passed between them.

The sequence is cut into N chunks of C tokens. With b the cumulative log-decay inside a chunk (b_t <= 0):
  intra:  o_t += scale * sum_{s<=t in chunk} q_t^T diag(exp(b_t - b_s)) k_s v_s
  inter:  o_t += scale * (q_t * exp(b_t))^T S_prev
  state:  S = diag(exp(b_C)) S_prev + sum_s (k_s * exp(b_C - b_s)) v_s^T
Every exponent is a sum of log-decays over an interval, hence <= 0: nothing overflows whatever the gate.
With `resets` (token t drops the state before it: a packed segment starts at t), r counts the resets inside the
chunk up to t: intra pairs need r_t == r_s, the inter term needs r_t == 0, and the state keeps S_prev only when
the chunk has no reset and the writes of its last segment only.
Per-key-channel decays compute the intra-chunk scores in sub-chunks of 16: between sub-chunks through
matmuls of q and k rescaled to the sub-chunk boundary, inside a sub-chunk through the masked [c, c, K] product.
Cost O(T C (K + V) + T K V); memory O(T (K + V) + (T / C) K V).
"""
import jax
import jax.numpy as jnp
from einops import rearrange

from mixers.ops.recurrence import shapes
from mixers.ops.recurrence.reference import chunk_segment_index

SUB_CHUNK = 16


def _split(x, chunk):
  """[B, N*C, H, ...] -> [N, B, H, C, ...]."""
  return rearrange(x, "b (n c) h ... -> n b h c ...", c=chunk)


def _causal_mask(c, exclusive):
  t = jnp.arange(c)
  return (t[None, :] < t[:, None]) if exclusive else (t[None, :] <= t[:, None])


def _masked_exp(diff, mask):
  return jnp.exp(jnp.where(mask, diff, -jnp.inf))


def _scores_vector_decay(q, k, b, exclusive):
  """Intra-chunk scores A `[..., C, C]` = sum_i q_ti k_si exp(b_ti - b_si) (masked) for per-channel b."""
  c_total = q.shape[-2]
  c = SUB_CHUNK if c_total % SUB_CHUNK == 0 else c_total
  n = c_total // c
  qs, ks, bs = (rearrange(a, "... (n c) k -> ... n c k", c=c) for a in (q, k, b))
  # Inside each sub-chunk: the masked [c, c, K] product.
  diag_mask = _causal_mask(c, exclusive)[:, :, None]
  w = _masked_exp(bs[..., :, None, :] - bs[..., None, :, :], diag_mask)
  a_diag = jnp.einsum("...tk,...sk,...tsk->...ts", qs, ks, w)  # [..., n, c, c]
  a = jnp.einsum("...nts,nm->...ntms", a_diag, jnp.eye(n, dtype=q.dtype))
  a = rearrange(a, "... n t m s -> ... (n t) (m s)")
  if n == 1:
    return a
  # Between sub-chunks (s in sub-chunk j < i): rescale both sides to r_i, the cumulative decay at the end of
  # sub-chunk i-1, so exp(b_t - r_i) and exp(r_i - b_s) are both <= 1.
  r = jnp.concatenate([jnp.zeros_like(bs[..., :1, -1, :]), bs[..., :-1, -1, :]], axis=-2)  # [..., n, K]
  q_in = qs * jnp.exp(bs - r[..., :, None, :])  # [..., n, c, K]
  pos = jnp.arange(c_total)
  earlier = pos[None, :] < (jnp.arange(n) * c)[:, None]  # [n, C]: s before sub-chunk i starts
  k_in = k[..., None, :, :] * _masked_exp(r[..., :, None, :] - b[..., None, :, :], earlier[:, :, None])
  a_off = jnp.einsum("...ntk,...nsk->...nts", q_in, k_in)  # [..., n, c, C]
  return a + rearrange(a_off, "... n t s -> ... (n t) s")


def recurrence(q, k, v, log_decay=None, *, scale=1.0, initial_state=None, exclusive=False, chunk_size=64,
               resets=None):
  """(o `[B,T,H,V]`, final state `[B,H,K,V]`); any T (padded inside to a multiple of chunk_size); resets None or
  bool `[B,T]`."""
  bsz, t, h, dk = q.shape
  dv = v.shape[-1]
  dtype = shapes.compute_dtype(q, k, v)
  chunk = min(chunk_size, max(t, 1))
  pad = (-t) % chunk

  def prep(x):
    x = x.astype(dtype)
    return _split(jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)), chunk)

  qc, kc, vc = prep(q), prep(k), prep(v)  # [N,B,H,C,*]
  mask = _causal_mask(chunk, exclusive)
  if log_decay is None:
    scores = jnp.where(mask, jnp.einsum("...tk,...sk->...ts", qc, kc), 0)
    q_in, k_out, chunk_decay = qc, kc, None
  else:
    b = jnp.cumsum(prep(log_decay), axis=3)  # [N,B,H,C] or [N,B,H,C,K]
    b_end = b[:, :, :, -1:]
    if log_decay.ndim == 3:
      scores = jnp.einsum("...tk,...sk->...ts", qc, kc) * _masked_exp(b[..., :, None] - b[..., None, :], mask)
      q_in, k_out = qc * jnp.exp(b)[..., None], kc * jnp.exp(b_end - b)[..., None]
      chunk_decay = jnp.exp(b_end[..., 0])[..., None, None]  # [N,B,H,1,1]
    else:
      scores = _scores_vector_decay(qc, kc, b, exclusive)
      q_in, k_out = qc * jnp.exp(b), kc * jnp.exp(b_end - b)
      chunk_decay = jnp.exp(b_end[..., 0, :])[..., None]  # [N,B,H,K,1]
  if resets is not None:
    run = rearrange(chunk_segment_index(resets, chunk), "b n c -> n b 1 c")
    scores = jnp.where(run[..., :, None] == run[..., None, :], scores, 0)
    q_in = q_in * (run == 0)[..., None]
    k_out = k_out * (run == run[..., -1:])[..., None]
    keep = (run[..., -1] == 0)[..., None, None].astype(dtype)  # [N,B,1,1,1]: no reset in the chunk
    chunk_decay = keep if chunk_decay is None else chunk_decay * keep
  o = jnp.einsum("...ts,...sv->...tv", scores, vc)
  local = jnp.einsum("...sk,...sv->...kv", k_out, vc)  # each chunk's own contribution to the state

  s0 = jnp.zeros((bsz, h, dk, dv), dtype) if initial_state is None else initial_state.astype(dtype)

  def pass_state(s, x):
    decay, contrib = x
    return (s if decay is None else decay * s) + contrib, s

  if initial_state is None and qc.shape[0] == 1:
    # One chunk, zero state: skip q_in @ 0, whose YNN fusion with the score sum XLA CPU 0.10.2 sometimes miscompiles.
    final, o = local[0], scale * o
  else:
    final, s_prev = jax.lax.scan(pass_state, s0, (chunk_decay, local))
    o = scale * (o + jnp.einsum("...tk,...kv->...tv", q_in, s_prev))
  o = rearrange(o, "n b h c v -> b (n c) h v")[:, :t]
  return o.astype(shapes.output_dtype(q, k, v)), final
