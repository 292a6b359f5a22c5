"""Monarch matrices and the Monarch DFT against dense forms built from their definitions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.linalg import block_diag
from jax.test_util import check_grads

import importlib
from mixers.ops import monarch_fft as mf

mo = importlib.import_module("mixers.ops.monarch")  # the module (mixers.ops.monarch is the function)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _rand(rng, *shape):
  return rng.standard_normal(shape)


def _transpose_perm(r, l):
  """Permutation matrix P with `P @ v == v.reshape(r, l).T.reshape(-1)`."""
  n = r * l
  src = np.arange(n).reshape(r, l).T.reshape(n)
  P = np.zeros((n, n))
  P[np.arange(n), src] = 1.0
  return P


def _dense_from_definition(L, R):
  """`P_out BD(L) P_mid BD(R)` with explicit permutation and block-diagonal matrices."""
  k, q, _ = R.shape
  l, s, r = L.shape
  return (_transpose_perm(l, s) @ np.asarray(block_diag(*L)) @ _transpose_perm(r, l)
          @ np.asarray(block_diag(*R)))


@pytest.mark.parametrize("shapes", [((5, 5, 5), (5, 5, 5)), ((3, 4, 5), (6, 7, 2))], ids=["square", "rect"])
def test_monarch_matches_dense_forms(shapes, x64):
  rng = np.random.default_rng(0)
  R, L = _rand(rng, *shapes[0]), _rand(rng, *shapes[1])
  x = _rand(rng, 2, 3, R.shape[0] * R.shape[2])
  dense = _dense_from_definition(L, R)
  m, y = jax.jit(lambda x, L, R: (mo.monarch_matrix(L, R), mo.monarch(x, L, R)))(x, L, R)
  np.testing.assert_allclose(m, dense, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(y, x @ dense.T, rtol=1e-12, atol=1e-12)
  check_grads(jax.jit(lambda x, L, R: mo.monarch(x, L, R)), (x, L, R), order=1, modes=["rev"])


def test_monarch_contract_square(x64):
  """The contract's definition, written out index by index for b = 3."""
  rng = np.random.default_rng(1)
  b = 3
  L, R, x = _rand(rng, b, b, b), _rand(rng, b, b, b), _rand(rng, b * b)
  X = x.reshape(b, b)
  Y = np.einsum("ijm,im->ij", R, X)
  W = np.einsum("ijm,im->ij", L, Y.T)
  np.testing.assert_allclose(mo.monarch(x, L, R), W.T.reshape(-1), rtol=1e-12)


def test_block_diagonal(x64):
  rng = np.random.default_rng(2)
  W, x = _rand(rng, 3, 4, 5), _rand(rng, 7, 15)
  np.testing.assert_allclose(mo.block_diagonal(x, W), x @ np.asarray(block_diag(*W)).T, rtol=1e-12)


@pytest.mark.parametrize("b,p", [(3, 2), (3, 3), (2, 4)])
def test_monarch_p_matches_dense_and_kron(b, p, x64):
  rng = np.random.default_rng(p)
  n = b ** p
  factors = [_rand(rng, n // b, b, b) for _ in range(p)]
  x = _rand(rng, 4, n)
  blocks = [_rand(rng, b, b) for _ in range(p)]
  tiled = [np.broadcast_to(a, (n // b, b, b)) for a in blocks]
  M, y, M_tiled = jax.jit(lambda x, factors, tiled: (mo.monarch_p_matrix(factors), mo.monarch_p(x, factors),
                                                      mo.monarch_p_matrix(tiled)))(x, factors, tiled)
  np.testing.assert_allclose(y, x @ np.asarray(M).T, rtol=1e-10, atol=1e-10)
  if p == 2:
    np.testing.assert_allclose(M, _dense_from_definition(factors[1], factors[0]), rtol=1e-12)
  # Constant blocks A_j per factor make the Kronecker product A_{p-1} x ... x A_0.
  kron = blocks[-1]
  for a in reversed(blocks[:-1]):
    kron = np.kron(kron, a)
  np.testing.assert_allclose(M_tiled, kron, rtol=1e-10, atol=1e-10)
  check_grads(jax.jit(lambda x, *f: mo.monarch_p(x, list(f))), (x, *factors), order=1, modes=["rev"])


def test_random_monarch_is_full_rank(x64):
  rng = np.random.default_rng(3)
  b = 6
  M, M3 = jax.jit(lambda L, R, fs: (mo.monarch_matrix(L, R), mo.monarch_p_matrix(fs)))(
      _rand(rng, b, b, b), _rand(rng, b, b, b), [_rand(rng, 9, 3, 3) for _ in range(3)])
  assert np.linalg.matrix_rank(np.asarray(M)) == b * b
  assert np.linalg.matrix_rank(np.asarray(M3)) == 27


@pytest.mark.parametrize("b1,b2", [(4, 4), (3, 5), (8, 2)])
def test_dft_factors_make_the_dft_matrix(b1, b2, x64):
  m, mi = jax.jit(lambda: (mo.monarch_matrix(*mf.dft_factors(b1, b2, dtype=jnp.complex128)),
                           mo.monarch_matrix(*mf.dft_factors(b1, b2, inverse=True, dtype=jnp.complex128))))()
  n = b1 * b2
  dft = np.fft.fft(np.eye(n), axis=0)
  np.testing.assert_allclose(np.asarray(m) @ _transpose_perm(b1, b2), dft, atol=1e-12)
  np.testing.assert_allclose(np.asarray(mi) @ _transpose_perm(b1, b2) / n,
                             np.fft.ifft(np.eye(n), axis=0), atol=1e-12)


@pytest.mark.parametrize("sizes", [(32, 64), (7, 3), (5, 4, 3), (4, 2, 4, 4)])
def test_monarch_fft_matches_jnp_fft(sizes):
  rng = np.random.default_rng(4)
  n = int(np.prod(sizes))
  x = jnp.asarray(_rand(rng, 3, n) + 1j * _rand(rng, 3, n), jnp.complex64)
  ref = np.fft.fft(np.asarray(x, np.complex128))
  scale = np.abs(ref).max()
  xr = jnp.asarray(_rand(rng, 2, n), jnp.float32)
  fwd, inv, real = jax.jit(lambda x, xr: (mf.fft(x, sizes=sizes), mf.fft(x, sizes=sizes, inverse=True),
                                          mf.fft(xr, sizes=sizes)))(x, xr)  # one program
  np.testing.assert_allclose(fwd, ref, atol=5e-6 * scale)
  np.testing.assert_allclose(inv, np.fft.ifft(np.asarray(x, np.complex128)), atol=5e-6 * scale / n)
  np.testing.assert_allclose(real, np.fft.fft(np.asarray(xr, np.float64)), atol=5e-6 * np.sqrt(n) * 4)


def test_fft_sizes_and_fast_len():
  for n in (2, 12, 200, 2048, 131072, 97):
    sizes = mf.fft_sizes(n, 64)
    assert int(np.prod(sizes)) == n
    assert n == 97 or max(sizes) <= 64
  assert mf.fft_sizes(4096, 64) == (64, 64)
  assert max(mf.fft_sizes(2160, 5)) <= 5 and len(mf.fft_sizes(2160, 5)) == 6  # 2160 = 2^4 3^3 5

  def smooth(m):
    for f in (2, 3, 5):
      while m % f == 0:
        m //= f
    return m == 1

  for n in (1, 13, 200, 2049):
    m = mf.fast_len(n)
    assert m >= n and smooth(m) and not any(smooth(c) for c in range(n, m))


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="L must have shape"):
    mo.monarch(jnp.ones(16), jnp.ones((4, 4, 3)), jnp.ones((4, 4, 4)))
  with pytest.raises(ValueError, match="x must have shape"):
    mo.monarch(jnp.ones(15), jnp.ones((4, 4, 4)), jnp.ones((4, 4, 4)))
  with pytest.raises(ValueError, match="R must have shape"):
    mo.monarch(jnp.ones(16), jnp.ones((4, 4, 4)), jnp.ones((16, 16)))
  with pytest.raises(ValueError, match=r"factors\[0\]"):
    mo.monarch_p(jnp.ones(27), [jnp.ones((3, 3, 3))] * 3)
  with pytest.raises(ValueError, match="sizes"):
    mf.fft(jnp.ones(12), sizes=(3, 5))
