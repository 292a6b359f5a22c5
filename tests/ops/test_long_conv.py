"""long_conv (both impls) against the direct O(T^2) sum, with gradients and causality."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers.ops.long_conv import long_conv, long_conv_matrix

conv = jax.jit(long_conv, static_argnames=("impl", "max_block"))


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def direct_conv(u, k, k_rev=None):
  """`y_t = sum_{s<=t} k_{t-s} u_s + sum_{s>t} k_rev_{s-t-1} u_s`, one lag at a time (numpy)."""
  u, k = np.asarray(u, np.float64), np.asarray(k, np.float64)
  T = u.shape[1]
  y = np.zeros_like(u)
  for lag in range(T):
    y[:, lag:] += k[lag] * u[:, :T - lag]
    if k_rev is not None:
      y[:, :T - lag - 1] += np.asarray(k_rev, np.float64)[lag] * u[:, lag + 1:]
  return y


def dense_conv(u, k, k_rev=None):
  """The same sum as a gathered Toeplitz matrix (jax, differentiable)."""
  T = u.shape[1]
  lag = np.arange(T)[:, None] - np.arange(T)[None, :]
  M = jnp.where((lag >= 0)[..., None], k[np.clip(lag, 0, T - 1)], 0.0)
  if k_rev is not None:
    M = M + jnp.where((lag < 0)[..., None], k_rev[np.clip(-lag - 1, 0, T - 1)], 0.0)
  return jnp.einsum("tsd,bsd->btd", M, u)


def _inputs(rng, T, D=3, B=2):
  return (rng.standard_normal((B, T, D)), rng.standard_normal((T, D)), rng.standard_normal((T, D)))


@pytest.mark.parametrize("impl", ["fft", "monarch"])
@pytest.mark.parametrize("T", [1, 7, 100])
def test_long_conv_matches_direct_sum(T, impl):
  rng = np.random.default_rng(T)
  u, k, kr = _inputs(rng, T)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  for k_rev in (None, kr):
    ref = direct_conv(u, k, k_rev)
    y = conv(f32(u), f32(k), k_rev=None if k_rev is None else f32(k_rev), impl=impl)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@functools.partial(jax.jit, static_argnames="causal")
def _vjps(u, k, k_rev, ct, causal):
  """Outputs and input cotangents of both impls and of the dense reference."""
  out = []
  for impl in ("fft", "monarch", None):
    def f(u, k, k_rev):
      k_rev = None if causal else k_rev
      return dense_conv(u, k, k_rev) if impl is None else long_conv(u, k, k_rev=k_rev, impl=impl)
    y, vjp = jax.vjp(f, u, k, k_rev)
    out.append((y, *vjp(ct)[:2 if causal else 3]))
  return out


@pytest.mark.parametrize("T,causal", [(7, False), (100, True), (100, False)])
def test_long_conv_gradients(T, causal, x64):
  rng = np.random.default_rng(10 + T)
  u, k, kr = _inputs(rng, T)
  ct = rng.standard_normal(u.shape)
  fft_out, monarch_out, ref = _vjps(u, k, kr, ct, causal)
  for a, b, r in zip(fft_out, monarch_out, ref):
    np.testing.assert_allclose(a, r, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(b, r, rtol=1e-9, atol=1e-9)


def test_monarch_impl_many_blocks_and_long():
  """Three-stage Monarch DFT (small max_block) and a longer sequence agree with the FFT impl."""
  rng = np.random.default_rng(5)
  for T, max_block in ((100, 8), (1000, 64)):
    u, k, kr = (jnp.asarray(a, jnp.float32) for a in _inputs(rng, T, D=4, B=1))
    ref = conv(u, k, k_rev=kr, impl="fft")
    y = conv(u, k, k_rev=kr, impl="monarch", max_block=max_block)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


def test_causal_long_conv_ignores_the_future():
  rng = np.random.default_rng(6)
  u, k, _ = (jnp.asarray(a, jnp.float32) for a in _inputs(rng, 20))
  u2 = u.at[:, 12:].set(jnp.asarray(rng.standard_normal((2, 8, 3)), jnp.float32))
  for impl in ("fft", "monarch"):
    y, y2 = conv(u, k, impl=impl), conv(u2, k, impl=impl)
    np.testing.assert_allclose(y[:, :12], y2[:, :12], atol=1e-5)
    assert np.abs(np.asarray(y[:, 12:] - y2[:, 12:])).max() > 1e-3


def test_long_conv_matrix_matches_direct_sum(x64):
  rng = np.random.default_rng(7)
  u, k, kr = _inputs(rng, 9)
  for k_rev in (None, kr):
    y = jnp.einsum("dts,bsd->btd", long_conv_matrix(k, k_rev), u)
    np.testing.assert_allclose(y, direct_conv(u, k, k_rev), rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise():
  u = jnp.ones((2, 8, 3))
  with pytest.raises(ValueError, match=r"k must have shape.*\[8, 3\]"):
    long_conv(u, jnp.ones((7, 3)))
  with pytest.raises(ValueError, match="k_rev must have shape"):
    long_conv(u, jnp.ones((8, 3)), k_rev=jnp.ones((8, 4)))
  with pytest.raises(ValueError, match="u must have shape"):
    long_conv(jnp.ones((8, 3)), jnp.ones((8, 3)))
  with pytest.raises(ValueError, match="impl"):
    long_conv(u, jnp.ones((8, 3)), impl="direct")
