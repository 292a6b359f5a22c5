"""LightNet's additive linear recurrence: keys normalised by a running (causal) or global softmax over positions.

Per key channel i, delta_s = exp(k_{s,i}):
  causal:      o_t = scale * sum_i q_{t,i} sum_{s<=t} delta_s v_s / sum_{s<=t} delta_s
  non-causal:  o_t = scale * sum_i q_{t,i} sum_s delta_s v_s / sum_s delta_s   (one pass over any n-D grid)
Causal runs through the gated linear recurrence in log space: z_t = log sum_{s<=t} exp(k_s) (fp32), keys
k'_t = exp(k_t - z_t) <= 1 and per-channel log-decay z_{t-1} - z_t <= 0, so nothing overflows whatever the keys.
The state is (S `[B,H,K,V]`, z `[B,H,K]`): S the normalised sum, z the log of the running sum (-inf when empty).
With `phases` (MD-LRPE), q and the normalised keys become [x cos(phi), x sin(phi)] (so S is `[B,H,2K,V]`).
With `segment_ids` (packed 1-D sequences) every sum, the normaliser's included, runs over t's segment only.
"""
import math

import jax
import jax.numpy as jnp

from mixers.ops import checks, sequence
from mixers.ops.attention import same_segment
from mixers.ops.positional import lrpe
from mixers.ops.recurrence import IMPLS

# Stand-in for log(0) inside the log-sum-exp: exactly zero weight after exp, yet finite, so no NaN gradients.
_LOG_ZERO = -1e30


def _check_inputs(q, k, v, causal, mask, phases):
  if q.ndim < 4:
    raise ValueError(f"q must have shape [B,*spatial,H,K] (at least [B,T,H,K]), got {tuple(q.shape)}")
  checks.check_float(q=q, k=k, v=v, phases=phases)
  if causal and q.ndim != 4:
    raise ValueError(f"causal lightnet needs a 1-D sequence q [B,T,H,K], got {tuple(q.shape)}")
  checks.check_shape("k", k, q.shape, f"{tuple(q.shape)} like q")
  checks.check_shape("v", v, q.shape[:-1] + (None,), f"{tuple(q.shape[:-1])} + (V,)")
  if mask is not None:
    checks.check_shape("mask", mask, q.shape[:-2], f"[B,*spatial] = {tuple(q.shape[:-2])}")
  if phases is not None and (phases.ndim != q.ndim or phases.shape[-1] != q.shape[-1] or any(
      p not in (1, d) for p, d in zip(phases.shape, q.shape))):
    raise ValueError(f"phases must broadcast to q's shape {tuple(q.shape)} with the same rank and last axis, "
                     f"got {tuple(phases.shape)}")


def _check_state(initial_state, q, v, key_dim):
  if initial_state is None:
    return
  if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
    raise ValueError("initial_state must be the pair (S [B,H,K,V], log running sum [B,H,K])")
  s, z = initial_state
  b, h, dk, dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
  checks.check_shape("initial_state[0]", s, (b, h, key_dim, dv), f"[B,H,K,V] = {(b, h, key_dim, dv)}")
  checks.check_shape("initial_state[1]", z, (b, h, dk), f"[B,H,K] = {(b, h, dk)}")


def _masked_keys(k, mask):
  """k in float32 (or wider) with masked positions set to log(0)."""
  k = k.astype(jnp.promote_types(k.dtype, jnp.float32))
  if mask is None:
    return k
  return jnp.where(mask[..., None, None], k, _LOG_ZERO)


def _expand(x, phases):
  return x if phases is None else lrpe(x, phases)


def _repeat_channels(x, phases):
  return x if phases is None else jnp.concatenate([x, x], axis=-1)


def causal_keys(k, *, log_sum=None, mask=None, resets=None):
  """(k' `[B,T,H,K]`, log-decay `[B,T,H,K]`, final log sum `[B,H,K]`) of the causal additive recurrence.

  z_t = logaddexp(z_0, logcumsumexp(k)_t), k'_t = exp(k_t - z_t), g_t = z_{t-1} - z_t (0 while nothing is summed,
  and at a segment start of `resets` `[B,T]`, where the sums restart).
  """
  km = _masked_keys(k, mask)
  z0 = (jnp.full((k.shape[0],) + k.shape[2:], _LOG_ZERO, km.dtype) if log_sum is None
        else jnp.maximum(log_sum.astype(km.dtype), _LOG_ZERO))
  z, entering, final = sequence.logcumsumexp_over_time(km, z0, resets)
  z_prev = jnp.concatenate([entering[:, None], z[:, :-1]], axis=1)
  empty = z_prev <= _LOG_ZERO / 2
  if resets is not None:
    empty = empty | resets[:, :, None, None]
  log_decay = jnp.where(empty, 0.0, jnp.minimum(z_prev - z, 0.0))
  k_norm = jnp.exp(km - z)
  if mask is not None:
    k_norm = jnp.where(mask[..., None, None], k_norm, 0.0)
  return k_norm, log_decay, jnp.where(final <= _LOG_ZERO / 2, -jnp.inf, final)


def _causal(q, k, v, *, scale, initial_state, mask, phases, chunk_size, impl, segment_ids=None):
  s0, z0 = (None, None) if initial_state is None else initial_state
  k_norm, log_decay, z_final = causal_keys(k, log_sum=z0, mask=mask, resets=sequence.segment_starts(segment_ids))
  if mask is not None:
    v = jnp.where(mask[..., None, None], v, 0)
  phases = None if phases is None else jnp.broadcast_to(phases, q.shape)
  q_in = _expand(q.astype(k_norm.dtype), phases)
  k_in = _expand(k_norm, phases)
  o, s = sequence.recurrence(q_in, k_in, v, _repeat_channels(log_decay, phases), scale=scale, initial_state=s0,
                             chunk_size=chunk_size, impl=impl, segment_ids=segment_ids)
  return o.astype(jnp.result_type(q, k, v)), (s, z_final)


def _non_causal_packed(q, k, v, *, scale, mask, phases, chunk_size, segment_ids):
  """Per segment: z = log of the segment's sum of exp(k) (a running log-sum each way, the backward one exclusive),
  then o_t = scale q_t^T sum_{s in t's segment} exp(k_s - z) v_s through the packed non-causal linear pass."""
  km = _masked_keys(k, mask)
  none = jnp.full((k.shape[0],) + k.shape[2:], _LOG_ZERO, km.dtype)
  forward, _, _ = sequence.logcumsumexp_over_time(km, none, sequence.segment_starts(segment_ids))
  backward, _, _ = sequence.logcumsumexp_over_time(km, none, sequence.segment_starts(segment_ids, True), reverse=True)
  after = sequence.shift(backward, -1)  # the log-sum over s > t: t+1's backward running sum
  split = sequence.current_split()
  last = sequence.positions(q.shape[1]) == (q.shape[1] if split is None else split.length) - 1
  ends = (sequence.segment_starts(segment_ids, reverse=True) | last[None])[:, :, None, None]  # t ends its segment
  z = jnp.logaddexp(forward, jnp.where(ends, _LOG_ZERO, after))
  k_norm = jnp.exp(km - z)
  if mask is not None:
    k_norm = jnp.where(mask[..., None, None], k_norm, 0.0)
    v = jnp.where(mask[..., None, None], v, 0)
  phases = None if phases is None else jnp.broadcast_to(phases, q.shape)
  q_in, k_in = _expand(q.astype(km.dtype), phases), _expand(k_norm, phases)
  kw = dict(scale=scale, chunk_size=chunk_size, segment_ids=segment_ids, impl="chunked")
  o, _ = sequence.recurrence(q_in, k_in, v.astype(km.dtype), **kw)
  o_after, _ = sequence.recurrence(q_in, k_in, v.astype(km.dtype), exclusive=True, reverse=True, **kw)
  return (o + o_after).astype(jnp.result_type(q, k, v))


def _non_causal(q, k, v, *, scale, initial_state, mask, phases):
  """One pass: z = log sum_s exp(k_s) (merged with the initial state's), S = sum_s exp(k_s - z) v_s^T."""
  b, h, dk = q.shape[0], q.shape[-2], q.shape[-1]
  n = math.prod(q.shape[1:-2])  # positions of the grid, flattened row-major
  km = _masked_keys(k, mask).reshape(b, n, h, dk)
  vf = v.reshape(b, n, h, v.shape[-1]).astype(km.dtype)
  if mask is not None:
    vf = jnp.where(mask.reshape(b, n)[..., None, None], vf, 0)
  z = sequence.logsumexp_over_time(km)  # [B,H,K]
  if initial_state is not None:
    z = jnp.logaddexp(z, jnp.maximum(initial_state[1].astype(z.dtype), _LOG_ZERO))
  k_norm = jnp.exp(km - z[:, None])
  if mask is not None:
    k_norm = jnp.where(mask.reshape(b, n)[..., None, None], k_norm, 0.0)
  if phases is not None:
    phases = jnp.broadcast_to(phases, q.shape).reshape(km.shape)
  k_in = _expand(k_norm, phases)
  s = sequence.sum_over_time(jnp.einsum("bshk,bshv->bhkv", k_in, vf))
  if initial_state is not None:
    s0, z0 = initial_state
    s = s + _repeat_channels(jnp.exp(jnp.maximum(z0.astype(z.dtype), _LOG_ZERO) - z), phases)[..., None] * s0
  q_in = _expand(q.astype(km.dtype).reshape(km.shape), phases)
  o = scale * jnp.einsum("bthk,bhkv->bthv", q_in, s)
  o = o.reshape(q.shape[:-1] + (v.shape[-1],)).astype(jnp.result_type(q, k, v))
  return o, (s, jnp.where(z <= _LOG_ZERO / 2, -jnp.inf, z))


@sequence.splits_time("q", "k", "v", "phases", "segment_ids", batched=("initial_state",), pad_mask="mask")
def lightnet(q, k, v, *, causal=True, scale=None, initial_state=None, return_state=False, mask=None, phases=None,
             chunk_size=64, impl="auto", segment_ids=None):
  """LightNet mixing. q, k `[B,T,H,K]` (non-causal: any grid `[B,*spatial,H,K]`), v `[...,H,V]` -> o `[...,H,V]`.

  scale: defaults to K**-0.5. initial_state / returned state: (S `[B,H,K,V]` float32, log running sum `[B,H,K]`);
  continuing from the state of a prefix reproduces the full sequence. mask `[B,*spatial]` bool: False positions
  are left out of every sum (and their keys of the normaliser). phases: MD-LRPE angles broadcastable to q
  (see `mixers.ops.positional.lrpe_phases`), applied to q and to the normalised keys; S is then `[B,H,2K,V]`.
  chunk_size, impl: of the causal core (`gated_linear_recurrence`). segment_ids: `[B,T]` ints (packed 1-D
  sequences; a segment is a run of equal ids): every sum runs over t's segment, as if each were its own sequence
  (causal: initial_state reaches the first segment and the state returned is the last one's; non-causal: no
  initial_state or returned state).
  """
  checks.check_choice("impl", impl, IMPLS)
  _check_inputs(q, k, v, causal, mask, phases)
  key_dim = q.shape[-1] * (1 if phases is None else 2)
  _check_state(initial_state, q, v, key_dim)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if segment_ids is not None:
    if q.ndim != 4:
      raise ValueError(f"segment_ids need a 1-D sequence q [B,T,H,K], got {tuple(q.shape)}")
    segment_ids = checks.check_segment_ids(segment_ids, q.shape[0], q.shape[1])
    if not causal and (initial_state is not None or return_state):
      raise ValueError("non-causal lightnet with segment_ids has no initial_state or returned state (one per "
                       "segment)")
  if causal:
    o, state = _causal(q, k, v, scale=scale, initial_state=initial_state, mask=mask, phases=phases,
                       chunk_size=chunk_size, impl=impl, segment_ids=segment_ids)
  elif segment_ids is not None:
    o, state = _non_causal_packed(q, k, v, scale=scale, mask=mask, phases=phases, chunk_size=chunk_size,
                                  segment_ids=segment_ids), None
  else:
    o, state = _non_causal(q, k, v, scale=scale, initial_state=initial_state, mask=mask, phases=phases)
  return (o, state) if return_state else o


def lightnet_reference(q, k, v, *, causal=True, scale=None, mask=None, phases=None, segment_ids=None):
  """The plain formula as a materialised `[B,H,T,T,K]` weight tensor (quadratic; grids flattened row-major); with
  `segment_ids` `[B,T]` the pairs of different segments are left out."""
  b, h, dk = q.shape[0], q.shape[-2], q.shape[-1]
  dtype = jnp.promote_types(jnp.result_type(q, k, v), jnp.float32)
  qf, kf = (x.reshape(b, -1, h, dk).astype(dtype) for x in (q, k))
  vf = v.reshape(b, -1, h, v.shape[-1]).astype(dtype)
  t = qf.shape[1]
  keep = jnp.ones((b, t), bool) if mask is None else mask.reshape(b, t)
  pair = keep[:, None, :] & (jnp.tril(jnp.ones((t, t), bool)) if causal else True)  # [B, t, s]
  if segment_ids is not None:
    pair = pair & same_segment(segment_ids)[:, 0]
  logits = jnp.where(pair[:, :, :, None, None], kf[:, None], -jnp.inf)  # [B,t,s,H,K]
  w = jnp.nan_to_num(jax.nn.softmax(logits, axis=2))
  scale = dk ** -0.5 if scale is None else scale
  if phases is None:
    o = jnp.einsum("bthk,btshk,bshv->bthv", qf, w, vf)
  else:
    ph = jnp.broadcast_to(phases, q.shape).reshape(b, t, h, dk).astype(dtype)
    rel = jnp.cos(ph[:, :, None] - ph[:, None, :])  # cos(phi_t - phi_s) [B,t,s,H,K]
    o = jnp.einsum("bthk,btshk,bshv->bthv", qf, w * rel, vf)
  return (scale * o).reshape(q.shape[:-1] + (v.shape[-1],))
