"""Linear attention on the gated linear-recurrence core, causal and non-causal, with optional normalisation.

Causal: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale q_t^T S_t; normalised, with
z_t = exp(g_t) z_{t-1} + k_t: o_t = scale q_t^T S_t / (scale q_t . z_t + eps). The normaliser is the same
recurrence run on a column of ones appended to v, so its gradients are exact by construction.
Non-causal: o_t = scale sum_s q_t^T diag(w_ts) k_s v_s, w_ts = exp(sum of g over (s, t]) (or (t, s]).
"""
import jax.numpy as jnp

from mixers.ops import checks, sequence
from mixers.ops.recurrence import shapes, step


def _default_scale(q, scale):
  return q.shape[-1] ** -0.5 if scale is None else scale


def _augment(v, normalize):
  """v `[..., V]` -> `[..., V+1]` with a column of ones (the normaliser's values)."""
  if not normalize:
    return v
  return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


def _pack_state(state, normalize, q, v, name="initial_state"):
  """Contract state (S or (S, z)) -> core state `[B,H,K,V(+1)]`."""
  if state is None:
    return None
  b, _, h, k = q.shape[0], None, q.shape[-2], q.shape[-1]
  dv = v.shape[-1]
  if not normalize:
    checks.check_shape(name, state, (b, h, k, dv), f"[B,H,K,V] = {(b, h, k, dv)}")
    return state
  if not isinstance(state, (tuple, list)) or len(state) != 2:
    raise ValueError(f"{name} must be a pair (S [B,H,K,V], z [B,H,K]) when normalize=True")
  s, z = state
  checks.check_shape(f"{name}[0] (S)", s, (b, h, k, dv), f"[B,H,K,V] = {(b, h, k, dv)}")
  checks.check_shape(f"{name}[1] (z)", z, (b, h, k), f"[B,H,K] = {(b, h, k)}")
  return jnp.concatenate([s, z[..., None].astype(s.dtype)], axis=-1)


def _unpack(o, state, normalize, eps, out_dtype):
  if not normalize:
    return o.astype(out_dtype), state
  o = o.astype(jnp.float32) if o.dtype != jnp.float64 else o
  o = o[..., :-1] / (o[..., -1:] + eps)
  state = None if state is None else (state[..., :-1], state[..., -1])
  return o.astype(out_dtype), state


def _noncausal(q, k, v, log_decay, scale, chunk_size, impl):
  """Without decay two matmuls through the global state; with decay a causal pass plus an exclusive reverse
  pass whose decay is shifted by one token (h_t = g_{t+1}): o_t reads sum_{s>t} exp(g_{t+1} + ... + g_s)."""
  if log_decay is None:
    dtype = shapes.compute_dtype(q, k, v)
    state = sequence.sum_over_time(jnp.einsum("bshk,bshv->bhkv", k.astype(dtype), v.astype(dtype)))
    return scale * jnp.einsum("bthk,bhkv->bthv", q.astype(dtype), state)
  kw = dict(scale=scale, chunk_size=chunk_size)
  forward, _ = sequence.recurrence(q, k, v, log_decay, impl=impl, **kw)
  backward, _ = sequence.recurrence(q, k, v, sequence.shift(log_decay, -1), exclusive=True, reverse=True,
                                    impl="chunked" if impl == "pallas" else impl, **kw)
  return forward.astype(jnp.promote_types(forward.dtype, jnp.float32)) + backward


@sequence.splits_time("q", "k", "v", "log_decay", batched=("initial_state",))
def linear_attention(q, k, v, *, causal=True, log_decay=None, normalize=False, scale=None, eps=1e-6,
                     initial_state=None, return_state=False, chunk_size=64, impl="auto"):
  """Linear attention. q, k `[B,T,H,K]`, v `[B,T,H,V]`, log_decay None | `[H]` | `[B,T,H]` | `[B,T,H,K]`.

  Returns o `[B,T,H,V]`, and with `return_state` (causal only) the final state: S `[B,H,K,V]`, or (S, z) with
  z `[B,H,K]` when normalize. `scale` defaults to K**-0.5. Any T; chunk_size in tokens; impl as in the core.
  """
  shapes.check_qkv(q, k, v)
  checks.check_positive_int("chunk_size", chunk_size)
  scale = _default_scale(q, scale)
  log_decay = shapes.normalize_log_decay(log_decay, q)
  out_dtype = shapes.output_dtype(q, k, v)
  v_in = _augment(v, normalize)
  if not causal:
    if initial_state is not None or return_state:
      raise ValueError("initial_state and return_state need causal=True (a non-causal mixer has no running state)")
    o = _noncausal(q, k, v_in, log_decay, scale, chunk_size, impl)
    return _unpack(o, None, normalize, eps, out_dtype)[0]
  state = _pack_state(initial_state, normalize, q, v)
  o, final = sequence.recurrence(q, k, v_in, log_decay, scale=scale, initial_state=state, chunk_size=chunk_size,
                                 impl=impl)
  o, final = _unpack(o, final, normalize, eps, out_dtype)
  return (o, final) if return_state else o


def linear_attention_step(q, k, v, state, *, log_decay=None, normalize=False, scale=None, eps=1e-6):
  """One causal token: q, k `[B,H,K]`, v `[B,H,V]`, log_decay None | `[H]` | `[B,H]` | `[B,H,K]`.

  `state` is S `[B,H,K,V]` (or (S, z) when normalize); returns (o `[B,H,V]`, new state).
  """
  checks.check_float(q=q, k=k, v=v)
  checks.check_rank("q", q, 3, "[B,H,K]")
  checks.check_shape("k", k, q.shape, f"{tuple(q.shape)} like q [B,H,K]")
  checks.check_shape("v", v, q.shape[:2] + (None,), f"[B,H,V] = {tuple(q.shape[:2])} + (V,)")
  b, h, dk = q.shape
  if log_decay is not None:
    log_decay = jnp.asarray(log_decay)
    if log_decay.shape == (h,):
      log_decay = jnp.broadcast_to(log_decay, (b, h))
    elif log_decay.shape not in ((b, h), (b, h, dk)):
      raise ValueError(f"log_decay must have shape None, [H]=({h},), [B,H]={(b, h)} or [B,H,K]={(b, h, dk)}, "
                       f"got {tuple(log_decay.shape)}")
    log_decay = checks.nonpositive_or_nan("log_decay", log_decay)
  scale = _default_scale(q, scale)
  core_state = _pack_state(state, normalize, q[:, None], v[:, None], name="state")
  if core_state is None:
    raise ValueError("state is required (zeros to start)")
  core_state = core_state.astype(jnp.promote_types(core_state.dtype, jnp.float32))
  o, new_state = step(q, k, _augment(v, normalize), core_state, log_decay, scale=scale)
  return _unpack(o, new_state, normalize, eps, shapes.output_dtype(q, k, v))
