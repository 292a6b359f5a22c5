"""Monarch matrices: products of block-diagonal matrices and reshape-transpose permutations.

Order 2 (the contract, square blocks): `M = P L P R` with P the transpose of a length-N axis viewed as
`[b, b]`; applying it is two batched GEMMs and reshapes, O(N sqrt N) instead of O(N^2).

Rectangular form (any sizes): R `[k, q, p]` maps `x` (N_in = k*p) to `k` blocks of width q; the
intermediate (k*q values) is viewed as `[r, l]` and transposed; L `[l, s, r]` maps each of the `l`
blocks to width s; the output `[l, s]` is transposed back and flattened (N_out = s*l). With
k = q = p = l = r = s = b this is exactly the contract's definition.

Order p (N = b**p): p block-diagonal factors of `N/b` blocks `[b, b]`, each followed by a cyclic
rotation of the `[b] * p` view of the axis; order 2 coincides with `monarch`.
"""
import jax.numpy as jnp

from mixers.ops import checks


def _check_blocks(name, w):
  checks.check_rank(name, w, 3, "[blocks, out, in]")


def block_diagonal(x, W, *, precision=None):
  """Block-diagonal map on the last axis: x `[..., n*i]`, W `[n, o, i]` -> `[..., n*o]`.

  `y[..., a, j] = sum_m W[a, j, m] x[..., a, m]` with x viewed as `[..., n, i]`.
  """
  _check_blocks("W", W)
  n, o, i = W.shape
  if x.ndim < 1 or x.shape[-1] != n * i:
    raise checks.shape_error("x", x, f"[..., {n * i}] (W has {n} blocks of [{o}, {i}])")
  X = x.reshape(*x.shape[:-1], n, i)
  Y = jnp.einsum("...am,ajm->...aj", X, W, precision=precision)
  return Y.reshape(*x.shape[:-1], n * o)


def _check_pair(L, R):
  _check_blocks("L", L)
  _check_blocks("R", R)
  k, q, _ = R.shape
  l, _, r = L.shape
  if k * q != l * r:
    raise ValueError(f"L must have shape [l, s, r] with l*r == {k * q} (R {tuple(R.shape)} makes "
                     f"{k}x{q} intermediate values), got {tuple(L.shape)}")


def monarch(x, L, R, *, precision=None):
  """Applies the Monarch matrix `P L P R` to the last axis of x.

  x `[..., k*p]`, R `[k, q, p]`, L `[l, s, r]` with k*q == l*r; returns `[..., s*l]`.
  Square contract (all sizes b): `Y = R-blocks(x.reshape(b, b))`, `W = L-blocks(swap(Y))`,
  `y = swap(W).reshape(N)`.
  """
  _check_pair(L, R)
  k, q, p = R.shape
  l, s, r = L.shape
  if x.ndim < 1 or x.shape[-1] != k * p:
    raise checks.shape_error("x", x, f"[..., {k * p}] (R has shape {tuple(R.shape)})")
  batch = x.shape[:-1]
  # Block-major layout, so that both products are plain batched GEMMs (batch axis leading).
  X = x.reshape(-1, k, p).transpose(1, 0, 2)  # [k, rows, p]
  Y = jnp.matmul(X, jnp.swapaxes(R, 1, 2), precision=precision)  # [k, rows, q]
  Z = Y.transpose(1, 0, 2).reshape(-1, r, l).transpose(2, 0, 1)  # [l, rows, r]
  W = jnp.matmul(Z, jnp.swapaxes(L, 1, 2), precision=precision)  # [l, rows, s]
  return W.transpose(1, 2, 0).reshape(*batch, s * l)


def _block_diag_dense(W):
  """`[n, o, i]` blocks -> the dense `[n*o, n*i]` block-diagonal matrix."""
  n, o, i = W.shape
  eye = jnp.eye(n, dtype=W.dtype)
  return jnp.einsum("ab,ajm->ajbm", eye, W).reshape(n * o, n * i)


def monarch_matrix(L, R):
  """The dense `[s*l, k*p]` matrix of `monarch(., L, R)` (`[N, N]` for square blocks), so that
  `monarch(x, L, R) == x @ monarch_matrix(L, R).T`.

  `M[(s', l'), :] = sum_r' L[l', s', r'] BD(R)[(r', l'), :]`, BD(R) the block-diagonal of R.
  """
  _check_pair(L, R)
  l, s, r = L.shape
  rows = _block_diag_dense(R).reshape(r, l, -1)
  return jnp.einsum("lsr,rln->sln", L, rows).reshape(s * l, -1)


def _check_factors(factors):
  if len(factors) < 1:
    raise ValueError("factors must be a non-empty sequence of [N/b, b, b] arrays")
  for j, f in enumerate(factors):
    _check_blocks(f"factors[{j}]", f)
  nb, b, b2 = factors[0].shape
  p = len(factors)
  if b != b2 or nb != b ** (p - 1):
    raise ValueError(f"factors[0] must have shape [b**{p - 1}, b, b] for an order-{p} Monarch, "
                     f"got {tuple(factors[0].shape)}")
  for j, f in enumerate(factors):
    if f.shape != factors[0].shape:
      raise ValueError(f"factors[{j}] must have shape {tuple(factors[0].shape)}, got {tuple(f.shape)}")
  return b, p


def monarch_p(x, factors, *, precision=None):
  """Order-p Monarch on the last axis: x `[..., b**p]`, factors p arrays `[b**(p-1), b, b]`.

  `factors[0]` is applied first. Each step applies the block-diagonal factor to x viewed as
  `[b**(p-1), b]` (last axis contiguous), then rotates the view `[b**(p-1), b] -> [b, b**(p-1)]`;
  after p rotations the axis is back in order. `monarch(x, L, R) == monarch_p(x, [R, L])`.
  """
  b, p = _check_factors(factors)
  n = b ** p
  if x.ndim < 1 or x.shape[-1] != n:
    raise checks.shape_error("x", x, f"[..., {n}] (order-{p} Monarch with blocks of {b})")
  batch = x.shape[:-1]
  for f in factors:
    y = jnp.einsum("...im,ijm->...ij", x.reshape(*batch, n // b, b), f, precision=precision)
    x = jnp.swapaxes(y, -1, -2).reshape(*batch, n)
  return x


def monarch_p_matrix(factors):
  """The dense `[N, N]` matrix of `monarch_p(., factors)`: the product of the block-diagonal
  matrices and explicit rotation permutation matrices, `M = prod_j (Q BD(F_j))` (last factor leftmost)."""
  b, p = _check_factors(factors)
  n = b ** p
  dtype = jnp.result_type(*[f.dtype for f in factors])
  # Q moves entry (a, c) of the [n/b, b] view to (c, a) of the [b, n/b] view.
  src = jnp.arange(n).reshape(n // b, b).T.reshape(n)
  Q = jnp.zeros((n, n), dtype).at[jnp.arange(n), src].set(1)
  M = jnp.eye(n, dtype=dtype)
  for f in factors:
    M = Q @ _block_diag_dense(f) @ M
  return M
