"""MD-LRPE scores depend only on the relative n-D offset; MD-TPE is the per-axis Toeplitz sum lambda^|offset|."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers.layers.positional import MdLrpe, MdTpe
from mixers.ops import positional

HEADS, DIM = 2, 12


@pytest.mark.parametrize("num_axes", [1, 2, 3])
def test_md_lrpe_scores_depend_only_on_relative_offset(num_axes):
  rng = np.random.default_rng(num_axes)
  q, k = (jnp.asarray(rng.standard_normal((HEADS, DIM)), jnp.float32) for _ in range(2))
  p, p2, shift = (jnp.asarray(rng.integers(-20, 20, num_axes)) for _ in range(3))
  lrpe = MdLrpe(base=100.0)
  score = lambda a, b: jnp.sum(lrpe.apply({}, q, a) * lrpe.apply({}, k, b), axis=-1)  # [H]

  @jax.jit
  def scores(q, k, p, p2, shift):  # one program: every score compared below
    expected = jnp.sum(q * k * jnp.cos(positional.lrpe_phases(p - p2, DIM, base=100.0)), axis=-1)
    moved = p2.at[num_axes - 1].add(3)  # a different offset along any one axis changes the score
    return lrpe.apply({}, q, p), score(p, p2), score(p + shift, p2 + shift), expected, score(p, moved)

  rotated, s, shifted, expected, s_moved = scores(q, k, p, p2, shift)
  assert rotated.shape == (HEADS, 2 * DIM)
  np.testing.assert_allclose(s, shifted, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(s, expected, rtol=2e-4, atol=2e-4)
  assert not np.allclose(s, s_moved, atol=1e-3)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


LOG_DECAY = np.log(np.array([0.5, 0.9]))


@functools.partial(jax.jit, static_argnames="causal")
def tpe(x, causal):
  return positional.md_tpe(x, jnp.asarray(LOG_DECAY, x.dtype), causal=causal, impl="chunked", chunk_size=8)


@pytest.mark.parametrize("causal", [False, True])
def test_md_tpe_matrix_of_impulses(x64, causal):
  n = 11  # impulses: x[0, s, h, d] = [s == d], so y[0, t, h, s] is the mixing matrix W_h[t, s]
  x = jnp.broadcast_to(jnp.eye(n)[None, :, None, :], (1, n, HEADS, n))
  w = jnp.moveaxis(tpe(x, causal)[0], 1, 0)  # [H, t, s]
  t = np.arange(n)
  expected = np.exp(LOG_DECAY[:, None, None] * np.abs(t[:, None] - t[None, :]))
  if causal:
    expected = np.tril(expected)
    np.testing.assert_array_equal(np.triu(np.asarray(w), 1), 0)
  else:
    np.testing.assert_allclose(w, np.swapaxes(w, 1, 2), rtol=1e-12)
  np.testing.assert_allclose(w, expected, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(positional.toeplitz_matrix(n, LOG_DECAY, causal=causal), expected, rtol=1e-12)


def test_md_tpe_on_a_grid_sums_the_axes(x64):
  x = np.random.default_rng(0).standard_normal((2, 4, 5, 3, HEADS, 3))
  t = [np.arange(n) for n in x.shape[1:4]]
  mats = [np.exp(LOG_DECAY[:, None, None] * np.abs(a[:, None] - a[None, :])) for a in t]  # numpy: no compile
  expected = (np.einsum("hts,bsjlhd->btjlhd", mats[0], x) + np.einsum("hts,bislhd->bitlhd", mats[1], x)
              + np.einsum("hts,bijshd->bijthd", mats[2], x))
  np.testing.assert_allclose(tpe(jnp.asarray(x), False), expected, rtol=1e-10)


def test_md_tpe_layer_decode_matches_forward_and_grid_input():
  x = jax.random.normal(jax.random.key(0), (2, 9, 8))
  layer = MdTpe(num_heads=2, causal=True, chunk_size=4)
  variables = jax.jit(functools.partial(layer.init, decode=True))(jax.random.key(1), x[:, :4])  # one init: both
  params, cache = variables["params"], variables["cache"]
  full = jax.jit(layer.apply)({"params": params}, x)
  step = jax.jit(lambda c, xs: layer.apply({"params": params, "cache": c}, xs, decode=True, mutable=["cache"]))
  outs = []
  for lo, hi in ((0, 4), (4, 5), (5, 9)):
    y, mut = step(cache, x[:, lo:hi])
    cache = mut["cache"]
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)
  grid = MdTpe(num_heads=2)
  xg = jax.random.normal(jax.random.key(2), (2, 3, 4, 8))
  vg = jax.jit(grid.init)(jax.random.key(3), xg)
  flat = MdTpe(num_heads=2, grid_shape=(3, 4))
  np.testing.assert_allclose(jax.jit(grid.apply)(vg, xg).reshape(2, 12, 8),
                             jax.jit(flat.apply)(vg, xg.reshape(2, 12, 8)), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="grid_shape"):
    MdTpe(num_heads=2, grid_shape=(5, 4)).init(jax.random.key(0), xg.reshape(2, 12, 8))
