"""lightnet (additive recurrence) against the plain float64 formula, causal and non-causal, with n-D grids."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers.ops.lightnet import lightnet, lightnet_reference as materialised_form
from mixers.ops.positional import grid_positions, lrpe_phases

BATCH, LENGTH, HEADS, KEY, VALUE = 2, 37, 3, 5, 7  # T not a multiple of the chunk (16)
CHUNK = 16


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def make_inputs(seed, *, shape=(BATCH, LENGTH), key_scale=1.0, dtype=np.float64):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal(shape + (HEADS, KEY))
  k = key_scale * rng.standard_normal(shape + (HEADS, KEY))
  v = rng.standard_normal(shape + (HEADS, VALUE))
  return tuple(jnp.asarray(a.astype(dtype)) for a in (q, k, v))


def plain_formula(q, k, v, *, causal=True, mask=None, phases=None):
  """numpy float64, per (t, channel i): q_ti * sum_s exp(k_si) cos(phi_ti - phi_si) v_s / sum_s exp(k_si)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, h, dk = q.shape
  keep = np.ones((b, t), bool) if mask is None else np.asarray(mask)
  ph = np.zeros(q.shape) if phases is None else np.broadcast_to(np.asarray(phases, np.float64), q.shape)
  o = np.zeros((b, t, h, v.shape[-1]))
  for i in range(t):
    src = np.arange(i + 1) if causal else np.arange(t)
    for bi in range(b):
      s = src[keep[bi, src]]
      if s.size == 0:
        continue
      w = np.exp(k[bi, s] - k[bi, s].max(0))  # [s, H, K]
      w = w / w.sum(0) * np.cos(ph[bi, i][None] - ph[bi, s])
      o[bi, i] = np.einsum("hk,shk,shv->hv", q[bi, i], w, v[bi, s])
  return o * dk ** -0.5


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2))


@functools.partial(jax.jit, static_argnames=("impl", "causal"))
def run(q, k, v, phases=None, mask=None, *, impl="chunked", causal=True):
  return lightnet(q, k, v, causal=causal, phases=phases, mask=mask, chunk_size=CHUNK, impl=impl)


lightnet_reference = jax.jit(materialised_form, static_argnames=("causal",))


@jax.jit
def run_with_state(q, k, v, state):
  return lightnet(q, k, v, initial_state=state, return_state=True, chunk_size=CHUNK, impl="chunked")


@pytest.mark.parametrize("key_scale", [1.0, 50.0])
def test_causal_forms_match_plain_formula(x64, key_scale):
  q, k, v = make_inputs(0, key_scale=key_scale)
  expected = plain_formula(q, k, v)
  for impl in ("chunked", "recurrent", "reference"):
    assert rel_err(run(q, k, v, impl=impl), expected) < 1e-10, impl


def test_causal_gradients_match_reference(x64):
  q, k, v = make_inputs(1, key_scale=3.0)
  ct = jnp.asarray(np.random.default_rng(2).standard_normal(v.shape))
  both = jax.jit(lambda q, k, v, ct: (jax.vjp(run, q, k, v)[1](ct), jax.vjp(lightnet_reference, q, k, v)[1](ct)))
  for name, g, g_ref in zip("qkv", *both(q, k, v, ct)):  # one program
    assert rel_err(g, g_ref) < 1e-9, name


def test_large_keys_stay_finite_in_float32():
  q, k, v = make_inputs(3, key_scale=50.0, dtype=np.float32)
  expected = plain_formula(q, k, v)
  o, grads = jax.jit(lambda q, k, v: (run(q, k, v), jax.grad(lambda k: jnp.sum(run(q, k, v) ** 2))(k)))(q, k, v)
  assert np.all(np.isfinite(np.asarray(o))) and np.all(np.isfinite(np.asarray(grads)))
  assert rel_err(o, expected) < 1e-4


def test_continuing_from_state_reproduces_full_sequence(x64):
  q, k, v = make_inputs(4, key_scale=5.0)
  full = plain_formula(q, k, v)

  @jax.jit
  def pieces(q, k, v):  # tokens [0, 18), then [18, 19) and [19, T) from the state, in one program
    o, state = run_with_state(q[:, :18], k[:, :18], v[:, :18], None)
    outs = [o]
    for lo, hi in ((18, 19), (19, LENGTH)):
      o, state = run_with_state(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], state)
      outs.append(o)
    return jnp.concatenate(outs, axis=1), state

  o, state = pieces(q, k, v)
  assert rel_err(o, full) < 1e-10
  assert state[1].shape == (BATCH, HEADS, KEY)


def test_causality(x64):
  q, k, v = make_inputs(5)
  t0 = 23
  perturb = lambda a: a.at[:, t0:].add(10.0)
  o, o_perturbed = jax.jit(lambda q, k, v: (run(q, k, v), run(perturb(q), perturb(k), perturb(v))))(q, k, v)
  np.testing.assert_allclose(o[:, :t0], o_perturbed[:, :t0], rtol=1e-12, atol=1e-12)
  assert not np.allclose(o[:, t0:], o_perturbed[:, t0:])


def test_causal_lrpe_and_mask_match_plain_formula(x64):
  q, k, v = make_inputs(6, key_scale=4.0)
  mask = np.random.default_rng(7).random((BATCH, LENGTH)) > 0.3
  mask[:, :3] = False

  @jax.jit
  def three(q, k, v, mask):  # phases; a mask; the mask with padding values 99 (which must not leak)
    phases = lrpe_phases(jnp.arange(LENGTH)[:, None], KEY, base=100.0)[None, :, None]
    return phases, run(q, k, v, phases), run(q, k, v, None, mask), \
        run(q, k, jnp.where(mask[..., None, None], v, 99.0), None, mask)

  phases, o_phases, o, o_other = three(q, k, v, mask)
  assert rel_err(o_phases, plain_formula(q, k, v, phases=phases)) < 1e-10
  keep = mask[..., None, None]
  assert rel_err(np.asarray(o) * keep, plain_formula(q, k, v, mask=mask) * keep) < 1e-10
  np.testing.assert_allclose(o_other * keep, o * keep, atol=1e-12)


GRID = (5, 6)


def test_non_causal_grid_is_one_scan_over_any_flattening(x64):
  q, k, v = make_inputs(8, shape=(BATCH,) + GRID, key_scale=4.0)
  flat = lambda a: a.reshape(BATCH, -1, *a.shape[3:])
  col_major = lambda a: flat(jnp.swapaxes(a, 1, 2))
  perm = np.random.default_rng(9).permutation(GRID[0] * GRID[1])
  shuffle = lambda a: flat(a)[:, perm].reshape(a.shape)

  @jax.jit
  def orders(q, k, v):  # the grid, its column-major flattening and a shuffle, in one program
    o = run(q, k, v, causal=False)
    o_cols = run(col_major(q), col_major(k), col_major(v), causal=False)
    o_shuffled = run(shuffle(q), shuffle(k), shuffle(v), causal=False)
    return o, o_cols, col_major(o), o_shuffled, shuffle(o)

  o, o_cols, o_col_major, o_shuffled, shuffled_o = orders(q, k, v)
  np.testing.assert_allclose(flat(o), plain_formula(flat(q), flat(k), flat(v), causal=False), rtol=1e-10)
  np.testing.assert_allclose(o_cols, o_col_major, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(o_shuffled, shuffled_o, rtol=1e-10, atol=1e-12)


def test_non_causal_lrpe_mask_and_gradients(x64):
  q, k, v = make_inputs(10, shape=(BATCH,) + GRID, key_scale=4.0)
  mask = np.random.default_rng(11).random((BATCH,) + GRID) > 0.3
  flat = lambda a: a.reshape(BATCH, -1, *a.shape[3:])
  ct = jnp.asarray(np.random.default_rng(12).standard_normal(v.shape))

  @jax.jit
  def forward_and_vjps(q, k, v, mask, ct):  # one program
    phases = lrpe_phases(grid_positions(GRID), KEY, base=100.0)[None, :, :, None]
    o = run(q, k, v, phases, mask, causal=False)
    _, vjp = jax.vjp(lambda *a: run(*a, phases, None, causal=False), q, k, v)
    _, vjp_ref = jax.vjp(lambda *a: lightnet_reference(*a, causal=False, phases=phases), q, k, v)
    return jnp.broadcast_to(phases, q.shape), o, vjp(ct), vjp_ref(ct)

  phases, o, grads, grads_ref = forward_and_vjps(q, k, v, mask, ct)
  expected = plain_formula(flat(q), flat(k), flat(v), causal=False, mask=flat(mask), phases=flat(phases))
  assert rel_err(flat(o), expected) < 1e-10
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    assert rel_err(g, g_ref) < 1e-9, name


def test_bad_inputs_raise():
  q, k, v = make_inputs(13, dtype=np.float32)
  with pytest.raises(ValueError, match="k must have shape"):
    lightnet(q, k[..., :-1], v)
  with pytest.raises(ValueError, match="mask must have shape"):
    lightnet(q, k, v, mask=jnp.ones((BATCH, LENGTH + 1), bool))
  with pytest.raises(ValueError, match="causal lightnet needs a 1-D sequence"):
    lightnet(q[:, None], k[:, None], v[:, None])
  with pytest.raises(ValueError, match="initial_state"):
    lightnet(q, k, v, initial_state=jnp.zeros((BATCH, HEADS, KEY, VALUE)))
