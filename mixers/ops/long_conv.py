"""Per-channel long convolutions along time, causal or bidirectional, in O(T log T).

`y_t = sum_{s<=t} k_{t-s} u_s + sum_{s>t} k_rev_{s-t-1} u_s` for u `[B,T,D]`, k and k_rev `[T,D]`.
Both sides fit in one circular convolution of length n >= 2T with the kernel
`[k_0 .. k_{T-1}, 0 .. 0, k_rev_{T-1} .. k_rev_0]` and u zero-padded, so nothing wraps around.
`impl="fft"` uses `jnp.fft`; `impl="monarch"` uses the Monarch-factored DFT (GEMMs only), which is
what maps onto matrix units. Packed rows (`segment_ids`) are laid out one segment per row of a
`[B, max_segments, T, D]` array (token t at its position inside its segment), convolved, and gathered back:
exact, at max_segments times the cost.
"""
import jax
import jax.numpy as jnp
import numpy as np

from mixers.ops import checks, monarch_fft, sequence
from mixers.ops.recurrence import reference

IMPLS = ("fft", "monarch")


def _check(u, k, k_rev):
  checks.check_float(u=u, k=k, k_rev=k_rev)
  checks.check_rank("u", u, 3, "[B, T, D]")
  _, T, D = u.shape
  checks.check_shape("k", k, (T, D), f"[T, D] = [{T}, {D}] (u has shape {tuple(u.shape)})")
  if k_rev is not None:
    checks.check_shape("k_rev", k_rev, (T, D), f"[T, D] = [{T}, {D}] (u has shape {tuple(u.shape)})")


def circular_kernel(k, k_rev, n):
  """`[n, D]` kernel of the length-n circular convolution equal to the linear one (n >= 2T)."""
  T, D = k.shape
  tail = jnp.zeros((n - T, D), k.dtype) if k_rev is None else jnp.concatenate(
      [jnp.zeros((n - 2 * T, D), k.dtype), jnp.flip(k_rev, 0).astype(k.dtype)], 0)
  return jnp.concatenate([k, tail], 0)


def segment_positions(segment_ids):
  """(segment index `[B,T]` (0, 1, ... along each row), position inside the segment `[B,T]`) of packed rows."""
  t = segment_ids.shape[1]
  starts = sequence.segment_starts(segment_ids)
  first = jax.lax.cummax(jnp.where(starts, jnp.arange(t), 0), axis=1)
  return reference.segment_index(starts), jnp.arange(t) - first


def _packed(u, k, k_rev, segment_ids, max_segments, **kw):
  """long_conv of each segment alone: scatter to `[B, max_segments, T, D]`, convolve, gather."""
  b, t, d = u.shape
  index, position = segment_positions(segment_ids)
  if checks.is_concrete(index):
    count = int(np.max(np.asarray(index))) + 1
    if max_segments is None:
      max_segments = count
    elif count > max_segments:
      raise ValueError(f"segment_ids hold {count} segments in a row, more than max_segments={max_segments}")
  elif max_segments is None:
    raise ValueError("max_segments (the most segments in a row) is needed when segment_ids are traced (under jit)")
  checks.check_positive_int("max_segments", max_segments)
  rows = jnp.arange(b)[:, None]
  laid = jnp.zeros((b, max_segments, t, d), u.dtype).at[rows, index, position].set(u, mode="drop")
  y = long_conv(laid.reshape(b * max_segments, t, d), k, k_rev=k_rev, **kw).reshape(b, max_segments, t, d)
  y = y[rows, jnp.minimum(index, max_segments - 1), position]
  overflow = jnp.any(index >= max_segments, axis=1)  # a row with too many segments: NaN (under jit)
  return jnp.where(overflow[:, None, None], jnp.nan, y)


def long_conv(u, k, *, k_rev=None, impl="fft", max_block=64, precision=monarch_fft.HIGHEST, segment_ids=None,
              max_segments=None):
  """Long convolution of u `[B,T,D]` with k (and k_rev) `[T,D]` -> `[B,T,D]` in u's dtype.

  impl: "fft" (jnp.fft, length 2T) or "monarch" (Monarch DFT of length `fast_len(2T)`, blocks of
  at most max_block). Accumulates in float32 (float64 for float64 inputs). segment_ids `[B,T]` ints
  (packed rows; a segment is a run of equal ids): each segment is convolved as its own sequence, at
  `max_segments` (the most segments in a row: counted when the ids are concrete, required under jit; rows
  with more give NaN there) times the cost.
  """
  checks.check_choice("impl", impl, IMPLS)
  checks.check_positive_int("max_block", max_block)
  _check(u, k, k_rev)
  B, T, D = u.shape
  if T == 0 or B == 0:
    return jnp.zeros(u.shape, u.dtype)
  if segment_ids is not None:
    segment_ids = checks.check_segment_ids(segment_ids, B, T)
    return _packed(u, k, k_rev, segment_ids, max_segments, impl=impl, max_block=max_block, precision=precision)
  ftype = jnp.float64 if u.dtype == jnp.float64 else jnp.float32
  uf, kf = u.astype(ftype), k.astype(ftype)
  krf = None if k_rev is None else k_rev.astype(ftype)
  if impl == "fft":
    n = 2 * T
    U = jnp.fft.rfft(uf, n=n, axis=1)
    K = jnp.fft.rfft(circular_kernel(kf, krf, n), n=n, axis=0)
    y = jnp.fft.irfft(U * K[None], n=n, axis=1)[:, :T]
  else:
    n = monarch_fft.fast_len(2 * T)
    sizes = monarch_fft.fft_sizes(n, max_block)
    K = monarch_fft.dft_stages(circular_kernel(kf, krf, n)[None], sizes, precision=precision)
    U = monarch_fft.dft_stages(uf, sizes, precision=precision)
    y = monarch_fft.idft_stages(U * K, sizes, out_len=T, real_output=True, precision=precision)
  return y.astype(u.dtype)


def long_conv_matrix(k, k_rev=None):
  """The `[D, T, T]` Toeplitz matrices of `long_conv`: `M[d, t, s] = k[t-s, d]` (s <= t),
  `k_rev[s-t-1, d]` (s > t, zero without k_rev); `y[b, t, d] = sum_s M[d, t, s] u[b, s, d]`."""
  checks.check_rank("k", k, 2, "[T, D]")
  T, _ = k.shape
  if k_rev is not None:
    checks.check_shape("k_rev", k_rev, k.shape, f"[T, D] = {list(k.shape)}")
  lag = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]
  lower = jnp.where((lag >= 0)[..., None], k[jnp.clip(lag, 0, T - 1)], 0)
  if k_rev is None:
    return jnp.moveaxis(lower, -1, 0)
  upper = jnp.where((lag < 0)[..., None], k_rev[jnp.clip(-lag - 1, 0, T - 1)], 0)
  return jnp.moveaxis(lower + upper, -1, 0)
