"""Mamba2's structured state space duality (SSD), causal, and VSSD's non-causal SSD.

Per batch element and head h (group g = h // (H // G)), with a_t = exp(dt_t A):
  causal:      y_t = sum_{s<=t} (C_t . B_s) exp(A sum_{r=s+1..t} dt_r) dt_s x_s + D x_t
  non-causal:  y_t = sum_s (C_t . B_s) (-A dt_s) x_s + D x_t
The causal form is the gated linear recurrence with q = C, k = B, v = dt x, log-decay = dt A, scale 1; its
state S_t = a_t S_{t-1} + (dt_t x_t) B_t^T is `[B,H,P,N]` here (the core keeps it as `[B,H,N,P]`).
impl="chunked" (and "auto" except where a kernel runs) is SSD's own chunked form, which keeps B and C per group:
the intra-chunk scores C B^T are computed once per group (not per head), and the chunk states are combined by an
associative scan (log-depth, cheap to differentiate). "pallas" (and "auto" where the program is lowered for a GPU
or TPU whose kernel takes the shapes) runs the Pallas kernel, which reads B and C by group; "recurrent" and
"reference" go through the core, with B and C broadcast from groups to heads. The non-causal form needs no scan:
S = sum_s (-A dt_s x_s) B_s^T, then y_t = S C_t (two matmuls).
"""
import functools

import jax
import jax.numpy as jnp
from einops import rearrange

from mixers.ops import checks, recurrence, sequence
from mixers.ops.attention import same_segment
from mixers.ops.recurrence import kernel_path, shapes
from mixers.ops.recurrence.shapes import heads_from_groups
from mixers.ops.recurrence.reference import chunk_segment_index

IMPLS = recurrence.IMPLS


def check_ssd_inputs(x, dt, A, B, C, D=None, name_suffix=""):
  """Validates the shapes of one SSD call; returns (batch, length, heads, head_dim, groups, state_dim)."""
  s = name_suffix
  checks.check_rank("x", x, 4, "[B,T,H,P]")
  b, t, h, p = x.shape
  checks.check_shape("dt" + s, dt, (b, t, h), f"[B,T,H] = {(b, t, h)}")
  checks.check_shape("A", A, (h,), f"[H] = ({h},)")
  checks.check_rank("B" + s, B, 4, f"[B,T,G,N] with [B,T] = {(b, t)}")
  checks.check_shape("B" + s, B, (b, t, None, None), f"[B,T,G,N] with [B,T] = {(b, t)}")
  g, n = B.shape[2:]
  if h % g:
    raise ValueError(f"the group count G={g} of B{s} {tuple(B.shape)} must divide the head count H={h} of x "
                     f"{tuple(x.shape)}")
  checks.check_shape("C" + s, C, B.shape, f"{tuple(B.shape)} like B{s} [B,T,G,N]")
  if D is not None and D.shape not in ((h,), (b, t, h)):
    raise ValueError(f"D must have shape [H] = ({h},) or [B,T,H] = {(b, t, h)}, got {tuple(D.shape)}")
  checks.check_float(x=x, A=A, D=D, **{"dt" + s: dt, "B" + s: B, "C" + s: C})
  return b, t, h, p, g, n


def checked_rates(A, dt):
  """A <= 0 and dt >= 0: raised when concrete; under jit the offending entries become NaN (so do the outputs)."""
  return checks.nonpositive_or_nan("A", A), checks.nonnegative_or_nan("dt", dt)


def skip(x, D):
  """D x with D `[H]` or `[B,T,H]`, x `[B,T,H,P]`."""
  return (D[..., None] * x).astype(x.dtype)


def _chunked(x, dt, A, B, C, *, chunk_size, initial_state, resets=None):
  """(y `[B,T,H,P]`, final state `[B,H,P,N]`) chunk by chunk; b = cumulative dt A inside a chunk:

    intra:  y_t += sum_{s<=t} (C_t . B_s) exp(b_t - b_s) dt_s x_s       (scores per group, decay per head)
    inter:  y_t += exp(b_t) S_prev C_t
    state:  S = exp(b_end) S_prev + sum_s exp(b_end - b_s) dt_s x_s B_s^T
  Every exponent is a sum of dt A over an interval (<= 0), masked to -inf before exp above the diagonal.
  `resets` (bool `[B,T]`, segment starts) restrict each term to one segment, as in the core's chunked form.
  """
  bsz, t, h, p = x.shape
  g, n = B.shape[2:]
  dtype = shapes.compute_dtype(x, dt, B, C)
  c = min(chunk_size, max(t, 1))
  pad = (-t) % c
  padded = lambda a: jnp.pad(a.astype(dtype), [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
  # Chunks and batch share one leading axis z = (m b): dot products then carry at most three batch axes.
  xs = rearrange(padded(x), "b (m c) (g j) p -> (m b) g j c p", c=c, g=g)
  dts = rearrange(padded(dt), "b (m c) (g j) -> (m b) g j c", c=c, g=g)
  bs, cs = (rearrange(padded(a), "b (m c) g n -> (m b) g c n", c=c) for a in (B, C))
  cum = jnp.cumsum(dts * A.astype(dtype).reshape(g, h // g, 1), axis=-1)  # [Z,G,J,c]
  v = dts[..., None] * xs
  lower = jnp.arange(c)[:, None] >= jnp.arange(c)[None, :]
  run = None
  if resets is not None:
    run = rearrange(chunk_segment_index(resets, c), "b m c -> (m b) c")
    lower = lower & (run[:, None, None, :, None] == run[:, None, None, None, :])
  decay = jnp.exp(jnp.where(lower, cum[..., :, None] - cum[..., None, :], -jnp.inf))  # [Z,G,J,c,c]
  scores = jnp.einsum("zgtn,zgsn->zgts", cs, bs)
  y = jnp.einsum("zgjts,zgjsp->zgjtp", scores[:, :, None] * decay, v)
  end = cum[..., -1]
  tail = jnp.exp(end[..., None] - cum)  # [Z,G,J,c]
  inflow = jnp.exp(cum)
  if run is not None:
    tail = tail * (run == run[:, -1:])[:, None, None]
    inflow = inflow * (run == 0)[:, None, None]
    end = jnp.where((run[:, -1] == 0)[:, None, None], end, -jnp.inf)  # a chunk with a start passes nothing on
  local = jnp.einsum("zgsn,zgjsp->zgjpn", bs, v * tail[..., None])
  by_chunk = lambda u: u.reshape(-1, bsz, *u.shape[1:])
  local, end = by_chunk(local), by_chunk(end)
  if initial_state is not None:
    s0 = initial_state.astype(dtype).reshape(1, bsz, g, h // g, p, n)
    local, end = jnp.concatenate([s0, local]), jnp.concatenate([jnp.zeros_like(end[:1]), end])

  def combine(first, second):  # (log-decay, state) of two consecutive spans -> of their union
    return first[0] + second[0], jnp.exp(second[0])[..., None, None] * first[1] + second[1]

  _, states = jax.lax.associative_scan(combine, (end, local))  # state after each chunk
  if initial_state is None:
    states = jnp.concatenate([jnp.zeros_like(states[:1]), states])
  prev = states[:-1].reshape(-1, *states.shape[2:])
  y = y + inflow[..., None] * jnp.einsum("zgtn,zgjpn->zgjtp", cs, prev)
  y = rearrange(y, "(m b) g j c p -> b (m c) (g j) p", b=bsz)[:, :t]
  return y, states[-1].reshape(bsz, h, p, n)


def causal_scan(x, dt, A, B, C, *, chunk_size, initial_state=None, reverse=False, impl="auto", segment_ids=None):
  """The causal SSD without the skip term: (y `[B,T,H,P]` in float32 or wider, final state `[B,H,P,N]`).

  `reverse` runs it from the last token to the first (y_t reads s >= t); `segment_ids` `[B,T]` restart it where a
  packed segment starts. "chunked" is the grouped chunked form on a whole sequence; "auto" is that form, or where the
  program is lowered for a platform whose kernel takes the shapes, the core on the kernel (chosen at lowering); a
  sequence split across devices, and the other impls, go through the core with q = C, k = B, v = dt x, log-decay =
  dt A.
  """
  if x.shape[0] == 0 or x.shape[1] == 0:
    b, _, h, p = x.shape
    dtype = shapes.compute_dtype(x, dt, B, C)
    state = jnp.zeros((b, h, p, B.shape[-1]), dtype) if initial_state is None else initial_state.astype(dtype)
    return jnp.zeros(x.shape, dtype), state
  kw = dict(chunk_size=chunk_size, initial_state=initial_state, reverse=reverse, segment_ids=segment_ids)
  if sequence.current_split() is not None:
    return _core_scan(x, dt, A, B, C, impl=impl, **kw)
  if impl == "chunked":
    return _grouped_scan(x, dt, A, B, C, **kw)
  if impl == "pallas":
    return _kernel_scan(x, dt, A, B, C, **kw)
  if impl != "auto":
    return _core_scan(x, dt, A, B, C, impl=impl, **kw)
  dtype = shapes.compute_dtype(x, dt, B, C)
  like = (C, B, jax.ShapeDtypeStruct(x.shape, dtype), jax.ShapeDtypeStruct(dt.shape, dtype))
  # select_at_lowering's chunk_size overrides kw's in the kernel branch
  return recurrence.select_at_lowering((x, dt, A, B, C), functools.partial(_grouped_scan, **kw),
                                       functools.partial(_kernel_scan, **kw), like, chunk_size)


def _grouped_scan(x, dt, A, B, C, *, chunk_size, initial_state, reverse, segment_ids):
  flip = (lambda a: jnp.flip(a, axis=1)) if reverse else (lambda a: a)
  resets = sequence.segment_starts(segment_ids, reverse)
  y, state = _chunked(flip(x), flip(dt), A, flip(B), flip(C), chunk_size=chunk_size, initial_state=initial_state,
                      resets=None if resets is None else flip(resets))
  return flip(y), state


def _core_inputs(x, dt, A, B, C, initial_state):
  """(dtype, v = dt x, log-decay = dt A, the initial state in the core's `[B,H,N,P]` layout) of the causal scan."""
  dtype = shapes.compute_dtype(x, dt, B, C)
  dt = dt.astype(dtype)
  s0 = None if initial_state is None else jnp.swapaxes(initial_state, -1, -2)
  return dtype, dt[..., None] * x.astype(dtype), dt * A.astype(dtype), s0


def _kernel_scan(x, dt, A, B, C, *, chunk_size, initial_state, reverse, segment_ids):
  """The Pallas kernel with q = C, k = B, read by group inside it (never broadcast to heads)."""
  dtype, v, log_decay, s0 = _core_inputs(x, dt, A, B, C, initial_state)
  flip = (lambda a: None if a is None else jnp.flip(a, axis=1)) if reverse else (lambda a: a)
  y, state = kernel_path.recurrence(flip(C), flip(B), flip(v), flip(log_decay), scale=1.0, initial_state=s0,
                                    chunk_size=chunk_size, resets=flip(sequence.segment_starts(segment_ids, reverse)))
  return flip(y).astype(dtype), jnp.swapaxes(state, -1, -2).astype(dtype)


def _core_scan(x, dt, A, B, C, *, chunk_size, initial_state, reverse, segment_ids, impl):
  """Through the core: q = C, k = B (broadcast from groups to heads)."""
  dtype, v, log_decay, s0 = _core_inputs(x, dt, A, B, C, initial_state)
  h = x.shape[2]
  y, state = sequence.recurrence(heads_from_groups(C, h), heads_from_groups(B, h), v, log_decay, scale=1.0,
                                 initial_state=s0, reverse=reverse, chunk_size=chunk_size, impl=impl,
                                 segment_ids=segment_ids)
  return y.astype(dtype), jnp.swapaxes(state, -1, -2).astype(dtype)


def _noncausal(x, dt, A, B, C, segment_ids=None, chunk_size=64):
  """Two matmuls per group: S = sum_s (-A dt_s x_s) B_s^T, y_t = S C_t; groups are never broadcast to heads.
  Packed (`segment_ids`): per segment, a causal pass plus an exclusive reversed pass without decay."""
  h, g = x.shape[2], B.shape[2]
  dtype = shapes.compute_dtype(x, dt, B, C)
  if segment_ids is not None:
    q, k = heads_from_groups(C, h).astype(dtype), heads_from_groups(B, h).astype(dtype)
    v = (dt.astype(dtype) * -A.astype(dtype))[..., None] * x.astype(dtype)
    kw = dict(scale=1.0, chunk_size=chunk_size, segment_ids=segment_ids, impl="chunked")
    forward, _ = sequence.recurrence(q, k, v, **kw)
    backward, _ = sequence.recurrence(q, k, v, exclusive=True, reverse=True, **kw)
    return forward + backward
  w = (dt.astype(dtype) * -A.astype(dtype))[..., None] * x.astype(dtype)  # [B,T,H,P]
  w = w.reshape(*w.shape[:2], g, h // g, w.shape[-1])
  state = sequence.sum_over_time(jnp.einsum("btgn,btgjp->bgjpn", B.astype(dtype), w))
  y = jnp.einsum("btgn,bgjpn->btgjp", C.astype(dtype), state)
  return y.reshape(x.shape)


def ssd_matrix(dt, A, B, C, *, D=None, causal=True, segment_ids=None):
  """The mixing matrix M `[B,H,T,T]` of `ssd` (y[:, t, h] = sum_s M[:, h, t, s] x[:, s, h]), D on its diagonal.

  Causal: M_ts = (C_t . B_s) exp(A sum_{r=s+1..t} dt_r) dt_s for s <= t (a semiseparable matrix);
  non-causal: M_ts = (C_t . B_s) (-A dt_s); with `segment_ids` `[B,T]`, zero between segments.
  """
  h = dt.shape[-1]
  dtype = shapes.compute_dtype(dt, B, C)
  dt = dt.astype(dtype)
  q, k = heads_from_groups(C, h).astype(dtype), heads_from_groups(B, h).astype(dtype)
  if causal:
    m = recurrence.mixing_matrix(q, k, dt * A.astype(dtype), scale=1.0, causal=True)
    m = m * jnp.moveaxis(dt, 1, 2)[:, :, None, :]
  else:
    m = jnp.einsum("bthn,bshn->bhts", q, k) * jnp.moveaxis(dt * -A.astype(dtype), 1, 2)[:, :, None, :]
  if segment_ids is not None:
    m = jnp.where(same_segment(segment_ids), m, 0)
  if D is not None:
    d = jnp.broadcast_to(D.astype(dtype), dt.shape)  # [B,T,H]
    m = m + jnp.moveaxis(d, 1, 2)[..., None] * jnp.eye(dt.shape[1], dtype=dtype)
  return m


@sequence.splits_time("x", "dt", "B", "C", "D", "segment_ids", batched=("initial_state",))
def ssd(x, dt, A, B, C, *, D=None, causal=True, chunk_size=64, initial_state=None, return_state=False,
        impl="auto", segment_ids=None):
  """Mamba2 SSD (causal) or VSSD's non-causal SSD.

  Args:
    x: `[B,T,H,P]` inputs (the values).
    dt: `[B,T,H]` positive step sizes (already through softplus); 0 marks a token that neither writes nor decays.
    A: `[H]` negative per-head rates (`-exp(A_log)`).
    B, C: `[B,T,G,N]` input and output projections; G divides H and head h reads group h // (H // G).
    D: None, `[H]` or `[B,T,H]`: the skip term D x.
    causal: the Mamba2 recurrence (True) or the non-causal sum over every position (False).
    chunk_size: chunk length of the chunked form (any T works).
    initial_state: `[B,H,P,N]` state before the first token (causal only).
    return_state: also return the final state `[B,H,P,N]` in float32 (causal only).
    impl: "auto" | "chunked" | "recurrent" | "reference" | "pallas": "chunked" is SSD's grouped chunked form
      ("auto" picks it on CPU); the others go to the recurrence core. For causal=False "reference"
      materialises the T x T matrix and every other choice runs the two matmuls.
    segment_ids: None or ints `[B,T]` (packed sequences; a segment is a run of equal ids): each segment is
      computed as its own sequence (initial_state reaches the first, the final state is the last one's).

  Returns:
    y `[B,T,H,P]` in x's dtype, or (y, final state) when `return_state`.
  """
  checks.check_choice("impl", impl, IMPLS)
  checks.check_positive_int("chunk_size", chunk_size)
  b, _, h, p, _, n = check_ssd_inputs(x, dt, A, B, C, D)
  A, dt = checked_rates(A, dt)
  if initial_state is not None:
    checks.check_shape("initial_state", initial_state, (b, h, p, n), f"[B,H,P,N] = {(b, h, p, n)}")
  segment_ids = checks.check_segment_ids(segment_ids, b, x.shape[1])
  if not causal:
    if initial_state is not None or return_state:
      raise ValueError("initial_state and return_state need causal=True (the non-causal SSD has no running state)")
    if impl == "reference":
      y = jnp.einsum("bhts,bshp->bthp", ssd_matrix(dt, A, B, C, causal=False, segment_ids=segment_ids),
                     x.astype(shapes.compute_dtype(x, dt, B, C)))
    else:
      y = _noncausal(x, dt, A, B, C, segment_ids, chunk_size)
    y = y.astype(x.dtype)
    return y if D is None else y + skip(x, D)
  y, state = causal_scan(x, dt, A, B, C, chunk_size=chunk_size, initial_state=initial_state, impl=impl,
                         segment_ids=segment_ids)
  y = y.astype(x.dtype)
  if D is not None:
    y = y + skip(x, D)
  return (y, state) if return_state else y


def ssd_step(x, dt, A, B, C, state, *, D=None):
  """One causal SSD token: x `[B,H,P]`, dt `[B,H]`, B and C `[B,G,N]`, state `[B,H,P,N]` -> (y `[B,H,P]`, state)."""
  checks.check_float(x=x, dt=dt, A=A, B=B, C=C, state=state)
  A, dt = checked_rates(A, dt)
  h = x.shape[1]
  dtype = state.dtype
  r = h // B.shape[1]
  bh, ch = (jnp.repeat(a.astype(dtype), r, axis=1) for a in (B, C))
  dt = dt.astype(dtype)
  state = jnp.exp(dt * A.astype(dtype))[..., None, None] * state + (dt[..., None] * x.astype(dtype))[..., None] * bh[
      :, :, None, :]
  y = jnp.einsum("bhpn,bhn->bhp", state, ch)
  if D is not None:
    y = y + D.astype(dtype)[..., None] * x.astype(dtype)
  return y.astype(x.dtype), state
