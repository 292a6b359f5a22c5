"""The DFT as Monarch factors: Cooley-Tukey with small dense DFT blocks and twiddles, all GEMMs.

For N = b1 * b2, `n = b2 n1 + n2` and `k = k1 + b1 k2`:
`X[k] = sum_n2 w_b2^(n2 k2) w_N^(n2 k1) sum_n1 w_b1^(n1 k1) x[n]`, `w_m = exp(-2 pi i / m)`:
a GEMM with the b1-point DFT matrix, a diagonal twiddle, a GEMM with the b2-point DFT matrix and
a transpose. That is a Monarch matrix after an input permutation (`dft_factors`). Longer
factorisations (N = b1 * ... * bp) recurse on the second factor (`fft`, order p).

The staged forms keep the frequency axis in "digit order" (the axes `[k1, ..., kp]`, k1 the least
significant); a convolution multiplies spectra in that order and inverts without any transpose.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from mixers.ops import checks

HIGHEST = jax.lax.Precision.HIGHEST


def dft_matrix(n, *, inverse=False, dtype=jnp.complex64):
  """`[n, n]` DFT matrix `F[k, m] = exp(-+2 pi i k m / n)` (inverse: conjugate, unnormalised)."""
  sign = 1.0 if inverse else -1.0
  km = np.outer(np.arange(n), np.arange(n)) % n
  return jnp.asarray(np.exp(sign * 2j * np.pi * km / n), dtype)


def _twiddle(b, rest, *, inverse=False, dtype=jnp.complex64):
  """`[b, rest]` twiddles `exp(-+2 pi i k n' / (b * rest))`."""
  sign = 1.0 if inverse else -1.0
  kn = np.outer(np.arange(b), np.arange(rest)) % (b * rest)
  return jnp.asarray(np.exp(sign * 2j * np.pi * kn / (b * rest)), dtype)


def dft_factors(b1, b2, *, inverse=False, dtype=jnp.complex64):
  """Monarch factors of the N-point DFT, N = b1*b2: L `[b1, b2, b2]`, R `[b2, b1, b1]` with

  `fft(x) == monarch(swap(x), L, R)` where `swap` views x as `[b1, b2]` and transposes it,
  i.e. `F_N == monarch_matrix(L, R) @ P` (P that permutation).
  `R[n2, k1, n1] = w_b1^(n1 k1) w_N^(n2 k1)` (twiddles folded in), `L[k1, k2, n2] = w_b2^(n2 k2)`.
  """
  checks.check_positive_int("b1", b1)
  checks.check_positive_int("b2", b2)
  F1 = dft_matrix(b1, inverse=inverse, dtype=dtype)
  F2 = dft_matrix(b2, inverse=inverse, dtype=dtype)
  tw = _twiddle(b1, b2, inverse=inverse, dtype=dtype)  # [k1, n2]
  R = F1[None, :, :] * tw.T[:, :, None]
  L = jnp.broadcast_to(F2, (b1, b2, b2))
  return L, R


def fft_sizes(n, max_block=64):
  """Splits n into Monarch block sizes: the fewest factors no larger than max_block (as balanced
  as the prime factors allow), largest first. A prime factor above max_block stays one block."""
  checks.check_positive_int("n", n)
  primes, m, f = [], n, 2
  while f * f <= m:
    while m % f == 0:
      primes.append(f)
      m //= f
    f += 1
  if m > 1:
    primes.append(m)
  order = max(1, math.ceil(math.log(n) / math.log(max_block) - 1e-9)) if n > 1 else 1
  while True:
    bins = [1] * order
    for p in sorted(primes, reverse=True):
      bins[bins.index(min(bins))] *= p
    if max(bins) <= max_block or order >= len(primes):
      return tuple(sorted((b for b in bins if b > 1), reverse=True)) or (1,)
    order += 1


def fast_len(n):
  """Smallest 2^a 3^b 5^c >= n: a length whose DFT splits into small blocks."""
  best = 1 << max(0, (n - 1).bit_length())
  p5 = 1
  while p5 < best:
    p35 = p5
    while p35 < best:
      m = p35
      while m < n:
        m *= 2
      best = min(best, m)
      p35 *= 3
    p5 *= 5
  return best


def _block_gemm(W, x, precision, real_output=False):
  """`y[a, k, m] = sum_n W[k, n] x[a, n, m]`; a real x (or a real-only output) halves the work."""
  if not jnp.iscomplexobj(x):
    re = jnp.einsum("kn,anm->akm", W.real, x, precision=precision)
    im = jnp.einsum("kn,anm->akm", W.imag, x, precision=precision)
    return re if real_output else jax.lax.complex(re, im)
  if real_output:
    return (jnp.einsum("kn,anm->akm", W.real, x.real, precision=precision)
            - jnp.einsum("kn,anm->akm", W.imag, x.imag, precision=precision))
  return jnp.einsum("kn,anm->akm", W, x, precision=precision)


def dft_stages(x, sizes, *, precision=HIGHEST):
  """Forward DFT along axis 1 of x `[P, n, Q]` (n <= N = prod(sizes), zero-padded to N),
  returning `[P, N, Q]` complex in digit order: index `(k1, ..., kp)` row-major holds frequency
  `k1 + b1 (k2 + b2 (k3 + ...))`. The zero rows of the padding are never multiplied."""
  P, n, Q = x.shape
  N = math.prod(sizes)
  if n > N:
    raise ValueError(f"x must have at most {N} = prod(sizes) entries on axis 1, got shape {tuple(x.shape)}")
  cdtype = jnp.complex128 if x.dtype in (jnp.float64, jnp.complex128) else jnp.complex64
  lead, rest = P, N
  for j, b in enumerate(sizes):
    rest //= b
    W = dft_matrix(b, dtype=cdtype)
    if j == 0:
      rows = -(-n // rest)  # only the first `rows` inputs of each block can be non-zero
      x = jnp.pad(x, ((0, 0), (0, rows * rest - n), (0, 0)))
      W = W[:, :rows]
      x = x.reshape(lead, rows, rest * Q)
    else:
      x = x.reshape(lead, b, rest * Q)
    x = _block_gemm(W, x, precision)
    if rest > 1:
      x = (x.reshape(lead, b, rest, Q) * _twiddle(b, rest, dtype=cdtype)[:, :, None])
    lead *= b
  return x.reshape(P, N, Q)


def idft_stages(X, sizes, *, out_len=None, real_output=False, precision=HIGHEST):
  """Inverse of `dft_stages`: X `[P, N, Q]` in digit order -> `[P, out_len, Q]` in natural order,
  `x[m] = (1/N) sum_k X[k] exp(2 pi i k m / N)`; only the first out_len outputs are computed."""
  P, N, Q = X.shape
  if N != math.prod(sizes):
    raise ValueError(f"X must have {math.prod(sizes)} = prod(sizes) entries on axis 1, got shape {tuple(X.shape)}")
  out_len = N if out_len is None else out_len
  cdtype = X.dtype
  rests = [N // math.prod(sizes[:j + 1]) for j in range(len(sizes))]
  lead = P * N
  for j in reversed(range(len(sizes))):
    b, rest = sizes[j], rests[j]
    lead //= b
    X = X.reshape(lead, b, rest, Q)
    if rest > 1:
      X = X * _twiddle(b, rest, inverse=True, dtype=cdtype)[:, :, None]
    W = dft_matrix(b, inverse=True, dtype=cdtype) / b
    if j == 0:
      rows = -(-out_len // rest)
      W = W[:rows]
      X = _block_gemm(W, X.reshape(lead, b, rest * Q), precision, real_output=real_output)
      return X.reshape(P, rows * rest, Q)[:, :out_len]
    X = _block_gemm(W, X.reshape(lead, b, rest * Q), precision)


def digit_order_to_natural(X, sizes):
  """`[P, N, Q]` in digit order -> natural frequency order (a transpose of the digit axes)."""
  P, N, Q = X.shape
  p = len(sizes)
  X = X.reshape(P, *sizes, Q)
  return X.transpose(0, *range(p, 0, -1), p + 1).reshape(P, N, Q)


def fft(x, *, sizes=None, inverse=False, max_block=64, precision=HIGHEST):
  """DFT along the last axis through Monarch stages; equals `jnp.fft.fft` (`jnp.fft.ifft` when
  inverse). x `[..., N]`; sizes: block sizes with product N (default `fft_sizes(N, max_block)`)."""
  if x.ndim < 1:
    raise checks.shape_error("x", x, "[..., N]")
  N = x.shape[-1]
  sizes = tuple(sizes) if sizes is not None else fft_sizes(N, max_block)
  if math.prod(sizes) != N:
    raise ValueError(f"sizes must multiply to x.shape[-1] = {N}, got {sizes}")
  batch = x.shape[:-1]
  xf = x.reshape(-1, N, 1)
  if inverse:  # ifft(x) = conj(fft(conj(x))) / N
    xf = jnp.conj(xf.astype(jnp.result_type(xf.dtype, jnp.complex64)))
  y = digit_order_to_natural(dft_stages(xf, sizes, precision=precision), sizes)
  if inverse:
    y = jnp.conj(y) / N
  return y.reshape(*batch, N)
