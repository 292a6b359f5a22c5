"""Linear attention on the gated linear-recurrence core: causal, non-causal, cross, prefix-LM and block-causal.

Causal: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale q_t^T S_t; normalised, with
z_t = exp(g_t) z_{t-1} + k_t: o_t = scale q_t^T S_t / (scale q_t . z_t + eps). The normaliser is the same
recurrence run on a column of ones appended to v, so its gradients are exact by construction.
Non-causal: o_t = scale sum_s q_t^T diag(w_ts) k_s v_s, w_ts = exp(sum of g over (s, t]) (or (t, s]); without
decay k and v may have their own length (cross attention). Prefix-LM (`prefix_len`) and block-causal
(`block_size`) widen the causal mask with the same w_ts: the causal pass plus an exclusive reversed pass over the
keys that the wider mask adds (the prefix's, or each block's with the blocks folded into the batch), so both stay
sub-quadratic and keep the causal final state.
"""
import jax
import jax.numpy as jnp
import numpy as np

from mixers.ops import checks, sequence
from mixers.ops.recurrence import gated_linear_recurrence, shapes, step


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


def _keys_cut_along_time(k):
  """Whether k holds one slice of the time axis (inside a split), not every key (cross attention's k and v of
  another length stay whole on every slice)."""
  split = sequence.current_split()
  return split is not None and split.axis in jax.typeof(k).manual_axis_type.varying


def _no_pallas(impl):
  return "chunked" if impl == "pallas" else impl  # the kernels have no exclusive form


def _noncausal(q, k, v, log_decay, scale, chunk_size, impl, segment_ids=None):
  """Without decay (and unpacked) two matmuls through the global state; otherwise a causal pass plus an exclusive
  reverse pass whose decay is shifted by one token (h_t = g_{t+1}): o_t reads sum_{s>t} exp(g_{t+1} + ... + g_s);
  both passes restart where a packed segment starts."""
  if log_decay is None and segment_ids is None:
    dtype = shapes.compute_dtype(q, k, v)
    state = jnp.einsum("bshk,bshv->bhkv", k.astype(dtype), v.astype(dtype))
    state = sequence.sum_over_time(state) if _keys_cut_along_time(k) else state
    return scale * jnp.einsum("bthk,bhkv->bthv", q.astype(dtype), state)
  kw = dict(scale=scale, chunk_size=chunk_size, segment_ids=segment_ids)
  forward, _ = sequence.recurrence(q, k, v, log_decay, impl=impl, **kw)
  shifted = None if log_decay is None else sequence.shift(log_decay, -1)
  backward, _ = sequence.recurrence(q, k, v, shifted, exclusive=True, reverse=True, impl=_no_pallas(impl), **kw)
  return forward.astype(jnp.promote_types(forward.dtype, jnp.float32)) + backward


def _prefix_pass(q, k, v, log_decay, prefix_len, scale, chunk_size, impl):
  """What the prefix adds to the causal pass: o_t += scale sum_{t<s<P} q_t^T diag(w_ts) k_s v_s (P = prefix_len),
  an exclusive reversed pass over the keys s < P (the others zeroed) with decay h_t = g_{t+1}."""
  kw = dict(scale=scale, exclusive=True, reverse=True, chunk_size=chunk_size, impl=_no_pallas(impl))
  t = q.shape[1]
  decay = None if log_decay is None else sequence.shift(log_decay, -1)
  if isinstance(prefix_len, (int, np.integer)) and sequence.current_split() is None:
    # A static prefix on one device: the reversed pass runs over the prefix's tokens only.
    if prefix_len == 0:
      return jnp.zeros(v.shape, shapes.compute_dtype(q, k, v))
    cut = lambda x: None if x is None else x[:, :prefix_len]
    o, _ = sequence.recurrence(*(cut(x) for x in (q, k, v, decay)), **kw)
    return jnp.pad(o, [(0, 0), (0, t - prefix_len), (0, 0), (0, 0)])
  inside = sequence.positions(t)[None, :] < jnp.reshape(prefix_len, (-1, 1))  # [B or 1, T]
  o, _ = sequence.recurrence(q, jnp.where(inside[:, :, None, None], k, jnp.zeros_like(k)), v, decay, **kw)
  return o


def _block_pass(q, k, v, log_decay, block_size, scale, chunk_size, impl):
  """What the blocks add to the causal pass: o_t += scale sum_{s>t, s in t's block} q_t^T diag(w_ts) k_s v_s.
  T is padded to a multiple of block_size and the blocks folded into the batch, `[B,T,H,*] -> [B*T/bs,bs,H,*]`.
  Each block runs as an exclusive reversed recurrence with decay h_t = g_{t+1} (zero past the block's end)."""
  split = sequence.current_split()
  b, t = q.shape[:2]
  n = -(-t // block_size)

  def blocks(x):
    x = jnp.pad(x, [(0, 0), (0, n * block_size - t)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape((b * n, block_size) + x.shape[2:])

  decay = None
  if log_decay is not None:
    g = blocks(log_decay)
    decay = jnp.flip(jnp.concatenate([g[:, 1:], jnp.zeros_like(g[:, :1])], axis=1), axis=1)
  qb, kb, vb = (jnp.flip(blocks(x), axis=1) for x in (q, k, v))
  # Inside a split the blocks are local to the slice; the scan's zero carry must vary like the slice's data.
  zero_state = sequence._zero_state  # pylint: disable=protected-access
  start = None if split is None else zero_state(qb, vb, shapes.compute_dtype(q, k, v))
  o, _ = gated_linear_recurrence(qb, kb, vb, decay, scale=scale, initial_state=start, exclusive=True,
                                 chunk_size=chunk_size, impl=_no_pallas(impl))
  return jnp.flip(o, axis=1).reshape((b, n * block_size) + o.shape[2:])[:, :t]


@sequence.splits_time("q", "k", "v", "log_decay", "segment_ids", batched=("initial_state", "prefix_len"))
def linear_attention(q, k, v, *, causal=True, prefix_len=None, block_size=None, log_decay=None, normalize=False,
                     scale=None, eps=1e-6, initial_state=None, return_state=False, chunk_size=64, impl="auto",
                     segment_ids=None):
  """Linear attention. q, k `[B,T,H,K]`, v `[B,T,H,V]`, log_decay None | `[H]` | `[B,T,H]` | `[B,T,H,K]`.

  o_t = scale sum_{s visible from t} q_t^T diag(w_ts) k_s v_s (w_ts of the module docstring; all ones without
  decay), normalised by scale sum_s q_t^T diag(w_ts) k_s + eps when `normalize`. Visible: s <= t (causal); every
  s (`causal=False`); with causal, `prefix_len` P (int or int array `[B]`, 0 <= P <= T, checked when concrete,
  clipped in effect under jit; Prefix-LM): also s < P when t < P; `block_size` b (positive int; block-causal):
  s // b <= t // b. One of prefix_len and block_size.
  Cross attention: with `causal=False` and no decay, k `[B,Tk,H,K]` and v `[B,Tk,H,V]` may have any Tk.
  `segment_ids` `[B,T]` ints (packed sequences; a segment is a run of equal ids): s is visible from t only in t's
  segment, and each segment is computed as its own sequence (`initial_state` reaches the first segment, the
  returned state is the last segment's). Not with prefix_len, block_size or cross attention.

  Returns o `[B,T,H,V]`, and with `return_state` (causal only) the final state: S `[B,H,K,V]`, or (S, z) with
  z `[B,H,K]` when normalize. The state is always the causal one (S_T above), so decoding goes on causally after
  a Prefix-LM prefill, and a block-causal call on the next block from it gives the full forward's outputs there.
  `initial_state` is earlier context that every token sees through the causal pass (prefix and blocks alike).
  `scale` defaults to K**-0.5. Any T; chunk_size in tokens; impl as in the core. Split along time (sequence
  parallelism), block_size must divide the slice length.
  """
  shapes.check_qkv(q, k, v, cross=not causal)
  checks.check_positive_int("chunk_size", chunk_size)
  if prefix_len is not None or block_size is not None:
    if not causal:
      raise ValueError("prefix_len and block_size widen the causal mask: they need causal=True")
    if prefix_len is not None and block_size is not None:
      raise ValueError("prefix_len and block_size are two different masks: pass one of them, not both")
  split = sequence.current_split()
  if block_size is not None:
    checks.check_positive_int("block_size", block_size)
    if split is not None and split.slice_length % block_size:
      raise ValueError(f"block_size={block_size} must divide the length of each sequence slice "
                       f"({split.slice_length} tokens) to split block-causal linear attention along time")
  prefix_len = checks.check_prefix_len(prefix_len, q.shape[0], q.shape[1] if split is None else split.length)
  segment_ids = checks.check_segment_ids(segment_ids, q.shape[0], q.shape[1])
  if segment_ids is not None and (prefix_len is not None or block_size is not None or k.shape[1] != q.shape[1]):
    raise ValueError("segment_ids (packed sequences) cannot be combined with prefix_len, block_size or cross "
                     "attention (k and v of another length)")
  if k.shape[1] != q.shape[1] and log_decay is not None:
    raise ValueError(f"log_decay needs k and v as long as q: a decay between tokens of two sequences (Tq = "
                     f"{q.shape[1]}, Tk = {k.shape[1]}) has no meaning")
  scale = _default_scale(q, scale)
  log_decay = shapes.normalize_log_decay(log_decay, q)
  out_dtype = shapes.output_dtype(q, k, v)
  v_in = _augment(v, normalize)
  if not causal:
    if initial_state is not None or return_state:
      raise ValueError("initial_state and return_state need causal=True (a non-causal mixer has no running state)")
    o = _noncausal(q, k, v_in, log_decay, scale, chunk_size, impl, segment_ids)
    return _unpack(o, None, normalize, eps, out_dtype)[0]
  state = _pack_state(initial_state, normalize, q, v)
  o, final = sequence.recurrence(q, k, v_in, log_decay, scale=scale, initial_state=state, chunk_size=chunk_size,
                                 impl=impl, segment_ids=segment_ids)
  extra = None
  if prefix_len is not None:
    extra = _prefix_pass(q, k, v_in, log_decay, prefix_len, scale, chunk_size, impl)
  elif block_size is not None:
    extra = _block_pass(q, k, v_in, log_decay, block_size, scale, chunk_size, impl)
  if extra is not None:
    o = o.astype(jnp.promote_types(o.dtype, jnp.float32)) + extra
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
