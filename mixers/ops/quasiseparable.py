"""Hydra's quasiseparable mixer: a forward and a backward SSD, each shifted off the diagonal, plus a diagonal.

  y = shift(SS_f(x)) + flip(shift(SS_b(flip x))) + D x,   shift(u)_t = u_{t-1} (u_{-1} = 0)
that is, per batch element and head (a_r = exp(dt_r A) per direction),
  y_t = sum_{s<t} (Cf_{t-1} . Bf_s) dtf_s prod_{r=s+1..t-1} af_r x_s
      + sum_{s>t} (Cb_{t+1} . Bb_s) dtb_s prod_{r=t+1..s-1} ab_r x_s + D_t x_t.
The backward direction is the causal SSD run from the last token to the first. Padded positions get dt = 0 in
both directions, so they neither write to nor decay the state: a padded batch gives the real tokens exactly what
the unpadded sequences would (left or right padding). With `segment_ids` (packed sequences) both directions restart
at every segment boundary and neither shift crosses one.
"""
import jax.numpy as jnp

from mixers.ops import checks, sequence
from mixers.ops.attention import same_segment
from mixers.ops.ssd import IMPLS, causal_scan, check_ssd_inputs, checked_rates, skip, ssd_matrix


def _pair(name, value):
  if not isinstance(value, (tuple, list)) or len(value) != 2:
    raise ValueError(f"{name} must be a pair (forward, backward), got {type(value).__name__}")
  return tuple(value)


def token_mask(mask, lengths, batch, length):
  """A `[B,T]` bool of real tokens from `mask` `[B,T]` or `lengths` `[B]` (None when neither is given)."""
  if mask is not None and lengths is not None:
    raise ValueError("give mask or lengths, not both")
  if lengths is not None:
    lengths = jnp.asarray(lengths)
    checks.check_shape("lengths", lengths, (batch,), f"[B] = ({batch},)")
    return sequence.positions(length)[None, :] < lengths[:, None]
  if mask is not None:
    checks.check_shape("mask", mask, (batch, length), f"[B,T] = {(batch, length)}")
    return mask.astype(bool)
  return None


def _check(x, dt, A, B, C, D):
  dtf, dtb = _pair("dt", dt)
  bf, bb = _pair("B", B)
  cf, cb = _pair("C", C)
  check_ssd_inputs(x, dtf, A, bf, cf, D, name_suffix="[0] (forward)")
  check_ssd_inputs(x, dtb, A, bb, cb, None, name_suffix="[1] (backward)")
  A, dtf = checked_rates(A, dtf)
  dtb = checks.nonnegative_or_nan("dt[1] (backward)", dtb)
  return A, dtf, dtb, bf, bb, cf, cb


def quasiseparable_matrix(dt, A, B, C, *, D=None, mask=None, lengths=None, segment_ids=None):
  """The mixing matrix M `[B,H,T,T]` of `quasiseparable` (y[:, t, h] = sum_s M[:, h, t, s] x[:, s, h]).

  Strictly lower part: the forward semiseparable matrix shifted down one row; strictly upper part: the
  backward one, built on the reversed sequence, shifted and flipped back; D on the diagonal; with `segment_ids`
  `[B,T]`, zero between segments.
  """
  dtf, dtb = _pair("dt", dt)
  (bf, bb), (cf, cb) = _pair("B", B), _pair("C", C)
  b, t, _ = dtf.shape
  keep = token_mask(mask, lengths, b, t)
  if keep is not None:
    dtf, dtb = (jnp.where(keep[..., None], d, 0) for d in (dtf, dtb))
  m_f = ssd_matrix(dtf, A, bf, cf)  # [B,H,T,T]
  m_b = ssd_matrix(jnp.flip(dtb, 1), A, jnp.flip(bb, 1), jnp.flip(cb, 1))
  shift_rows = lambda m: jnp.pad(m, [(0, 0), (0, 0), (1, 0), (0, 0)])[:, :, :-1]
  m = shift_rows(m_f) + jnp.flip(shift_rows(m_b), (2, 3))
  if D is not None:
    d = jnp.broadcast_to(D.astype(m.dtype), dtf.shape)
    m = m + jnp.moveaxis(d, 1, 2)[..., None] * jnp.eye(t, dtype=m.dtype)
  if keep is not None:
    m = m * keep[:, None, :, None] * keep[:, None, None, :]
  if segment_ids is not None:
    m = jnp.where(same_segment(segment_ids), m, 0)
  return m


@sequence.splits_time("x", "dt", "B", "C", "D", "mask", "segment_ids", batched=("lengths",))
def quasiseparable(x, dt, A, B, C, *, D=None, chunk_size=64, impl="auto", mask=None, lengths=None,
                   segment_ids=None):
  """Hydra's bidirectional mixer.

  Args:
    x: `[B,T,H,P]`.
    dt, B, C: pairs (forward, backward) of `[B,T,H]`, `[B,T,G,N]`, `[B,T,G,N]` (as in `ssd`).
    A: `[H]` negative rates shared by both directions.
    D: None, `[H]` or `[B,T,H]` (Hydra's data-dependent diagonal).
    chunk_size, impl: as in `ssd`; "reference" materialises the T x T quasiseparable matrix.
    mask: optional `[B,T]` bool, True at real tokens; or lengths: `[B]` ints (real tokens are t < length).
      Padded positions contribute nothing to real tokens in either direction; their outputs are zero.
    segment_ids: optional `[B,T]` ints (packed sequences; a segment is a run of equal ids): each segment is mixed
      as its own sequence (both scans restart at its first token and neither shift crosses its edges).

  Returns:
    y `[B,T,H,P]` in x's dtype.
  """
  checks.check_choice("impl", impl, IMPLS)
  checks.check_positive_int("chunk_size", chunk_size)
  A, dtf, dtb, bf, bb, cf, cb = _check(x, dt, A, B, C, D)
  bsz, t = x.shape[:2]
  keep = token_mask(mask, lengths, bsz, t)
  segment_ids = checks.check_segment_ids(segment_ids, bsz, t)
  if keep is not None:
    x = jnp.where(keep[..., None, None], x, 0)
    dtf, dtb = (jnp.where(keep[..., None], d, 0) for d in (dtf, dtb))
  if impl == "reference":
    m = quasiseparable_matrix((dtf, dtb), A, (bf, bb), (cf, cb), D=D, segment_ids=segment_ids)
    y = jnp.einsum("bhts,bshp->bthp", m, x.astype(m.dtype)).astype(x.dtype)
  else:
    kw = dict(chunk_size=chunk_size, impl=impl, segment_ids=segment_ids)
    y_f, _ = causal_scan(x, dtf, A, bf, cf, **kw)
    y_b, _ = causal_scan(x, dtb, A, bb, cb, reverse=True, **kw)
    y_f, y_b = sequence.shift(y_f, 1), sequence.shift(y_b, -1)
    if segment_ids is not None:  # the shifts bring a neighbouring segment's last output: drop it
      y_f = jnp.where(sequence.segment_starts(segment_ids)[..., None, None], 0, y_f)
      y_b = jnp.where(sequence.segment_starts(segment_ids, reverse=True)[..., None, None], 0, y_b)
    y = y_f + y_b
    if D is not None:
      y = y + skip(x, D)
  if keep is not None:
    y = jnp.where(keep[..., None, None], y, 0)
  return y.astype(x.dtype)


__all__ = ["quasiseparable", "quasiseparable_matrix", "token_mask"]
