"""Multi-dimensional relative positional encodings as pure functions: MD-LRPE and MD-TPE (LightNet).

MD-LRPE: the feature axis D is split into n contiguous parts, one per grid axis; channel i of part a turns with
frequency theta_i at the token's coordinate p_a: phi_i = theta_i p_{a(i)}, and x -> [x cos(phi), x sin(phi)]
(the real form of x e^{i phi}), so  lrpe(q, p) . lrpe(k, p') = sum_i q_i k_i cos(theta_i (p - p')_{a(i)}).
MD-TPE: per head h a Toeplitz sum along every grid axis, y = sum_a sum_{p'_a} lambda_h^{|p_a - p'_a|} x[p'],
bidirectional, or causal (p'_a <= p_a only); computed with the gated linear recurrence, linear in the tokens.
"""
import jax.numpy as jnp
import numpy as np

from mixers.ops import checks
from mixers.ops.recurrence import gated_linear_recurrence
from mixers.ops.sequence import segment_starts


def grid_positions(spatial_shape):
  """Integer coordinates `[*spatial_shape, n]` of an n-D grid (row-major)."""
  spatial_shape = tuple(int(s) for s in spatial_shape)
  if not spatial_shape or any(s <= 0 for s in spatial_shape):
    raise ValueError(f"spatial_shape must be a non-empty tuple of positive sizes, got {spatial_shape}")
  grids = np.meshgrid(*(np.arange(s) for s in spatial_shape), indexing="ij")
  return jnp.asarray(np.stack(grids, axis=-1), jnp.int32)


def lrpe_frequencies(dim, num_axes, base=10000.0):
  """(theta `[dim]`, axis `[dim]`): part a (contiguous, sizes differing by at most one) has theta_j = base^(-j/d_a)."""
  checks.check_positive_int("dim", dim)
  checks.check_positive_int("num_axes", num_axes)
  if num_axes > dim:
    raise ValueError(f"num_axes={num_axes} must be <= dim={dim}: every grid axis needs a feature channel")
  sizes = [dim // num_axes + (a < dim % num_axes) for a in range(num_axes)]
  theta = np.concatenate([base ** (-np.arange(d) / d) for d in sizes])
  axis = np.concatenate([np.full(d, a) for a, d in enumerate(sizes)])
  return theta.astype(np.float32), axis.astype(np.int32)


def lrpe_phases(positions, dim, base=10000.0):
  """phi `[..., dim]` float32 from coordinates `[..., n]`: phi_i = theta_i * positions[..., axis(i)]."""
  positions = jnp.asarray(positions)
  if positions.ndim < 1:
    raise ValueError(f"positions must have shape [..., n] (n grid axes), got {tuple(positions.shape)}")
  theta, axis = lrpe_frequencies(dim, positions.shape[-1], base)
  return positions[..., axis].astype(jnp.float32) * theta


def lrpe(x, phases):
  """[x cos(phi), x sin(phi)] `[..., 2D]` for x `[..., D]` and phases broadcastable to x."""
  if phases.shape[-1] != x.shape[-1]:
    raise ValueError(f"phases must end in the feature size {x.shape[-1]} of x {tuple(x.shape)}, "
                     f"got {tuple(phases.shape)}")
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  phases = phases.astype(x32.dtype)
  return jnp.concatenate([x32 * jnp.cos(phases), x32 * jnp.sin(phases)], axis=-1).astype(x.dtype)


def _decayed_sum_along_time(x, log_decay, *, exclusive, initial_state, impl, chunk_size, resets=None):
  """sum_{s<=t} lambda^{t-s} x_s (s<t if exclusive; s in t's segment given resets `[B,T]`, the segment starts)
  for x `[B,T,H,D]` via the core; state `[B,H,1,D]` (the last segment's)."""
  ones = jnp.ones(x.shape[:3] + (1,), x.dtype)
  return gated_linear_recurrence(ones, ones, x, log_decay, scale=1.0, initial_state=initial_state,
                                 exclusive=exclusive, chunk_size=chunk_size, impl=impl, resets=resets)


def toeplitz_along_axis(x, log_decay, axis, *, causal, initial_state=None, chunk_size=64, impl="auto",
                        segment_ids=None):
  """One axis of MD-TPE: y[p] = sum_{p'} lambda_h^{|p_a - p'_a|} x[p'] over grid axis `axis` of x `[B,*S,H,D]`.

  segment_ids `[B,T]` (x `[B,T,H,D]` only): p' runs over p's segment only, each scan restarting at its starts.
  Returns (y like x, final state `[B*, H, 1, D]` of the forward scan, the other grid axes folded into batch).
  """
  xt = jnp.moveaxis(x, axis, -3)  # [B, *other axes, n_a, H, D]
  moved = xt.shape
  xt = xt.reshape((-1,) + moved[-3:])
  kw = dict(impl=impl, chunk_size=chunk_size)
  y, state = _decayed_sum_along_time(xt, log_decay, exclusive=False, initial_state=initial_state,
                                     resets=segment_starts(segment_ids), **kw)
  if not causal:
    back_resets = None if segment_ids is None else segment_starts(segment_ids, reverse=True)[:, ::-1]
    back, _ = _decayed_sum_along_time(xt[:, ::-1], log_decay, exclusive=True, initial_state=None,
                                      resets=back_resets, **kw)
    y = y + back[:, ::-1]
  return jnp.moveaxis(y.reshape(moved), -3, axis), state


def md_tpe(x, log_decay, *, causal=False, initial_state=None, return_state=False, chunk_size=64, impl="auto",
           segment_ids=None):
  """MD-TPE mixing: y = sum over grid axes a of the per-head Toeplitz sum along a; x `[B,*S,H,D]`, log_decay `[H]`.

  Causal (1-D only: x `[B,T,H,D]`) continues from `initial_state` `[B,H,1,D]` (the decayed running sum).
  segment_ids `[B,T]` ints (packed 1-D sequences; a segment is a run of equal ids): each segment is mixed as its own
  sequence, y_t = sum_{s in seg(t)} lambda^{|t-s|} x_s (causal: s <= t); `initial_state` reaches the first segment
  only and the returned state is the last segment's.
  """
  if x.ndim < 4:
    raise ValueError(f"x must have shape [B,*spatial,H,D] with at least one grid axis, got {tuple(x.shape)}")
  h = x.shape[-2]
  log_decay = jnp.asarray(log_decay)
  checks.check_shape("log_decay", log_decay, (h,), f"[H] = ({h},)")
  log_decay = checks.nonpositive_or_nan("log_decay", log_decay)
  if causal and x.ndim != 4:
    raise ValueError(f"causal MD-TPE needs a 1-D sequence x [B,T,H,D], got {tuple(x.shape)}")
  if initial_state is not None and not causal:
    raise ValueError("initial_state is only meaningful for causal MD-TPE")
  if initial_state is not None:
    checks.check_shape("initial_state", initial_state, (x.shape[0], h, 1, x.shape[-1]),
                       f"[B,H,1,D] = {(x.shape[0], h, 1, x.shape[-1])}")
  if segment_ids is not None:
    if x.ndim != 4:
      raise ValueError(f"segment_ids needs a 1-D sequence x [B,T,H,D], got x {tuple(x.shape)} (a grid)")
    checks.check_shape("segment_ids", segment_ids, x.shape[:2], f"[B,T] = {tuple(x.shape[:2])}")
  y, state = 0, None
  for axis in range(1, x.ndim - 2):
    y_a, state = toeplitz_along_axis(x, log_decay, axis, causal=causal, initial_state=initial_state,
                                     chunk_size=chunk_size, impl=impl, segment_ids=segment_ids)
    y = y + y_a
  return (y, state) if return_state else y


def toeplitz_matrix(n, log_decay, *, causal):
  """The `[H, n, n]` matrix of one axis of MD-TPE: exp(g_h |t - s|) (zero above the diagonal if causal)."""
  t = jnp.arange(n)
  dist = jnp.abs(t[:, None] - t[None, :]).astype(jnp.result_type(log_decay, jnp.float32))
  w = jnp.exp(jnp.asarray(log_decay)[:, None, None] * dist)
  return jnp.where(t[:, None] >= t[None, :], w, 0) if causal else w
