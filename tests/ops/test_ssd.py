"""ssd (Mamba2 and non-causal VSSD) against a float64 token loop and a dense form written from the definition."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers.ops.ssd import ssd, ssd_matrix, ssd_step

BATCH, LENGTH, HEADS, HEAD_DIM, STATE = 2, 37, 4, 5, 3  # T not a multiple of the chunk (8)
CHUNK = 8


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def make_inputs(seed, groups, *, t=LENGTH, dt_range=None, dtype=np.float64):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((BATCH, t, HEADS, HEAD_DIM))
  if dt_range is None:
    dt = np.log1p(np.exp(rng.standard_normal((BATCH, t, HEADS))))
  else:
    dt = np.exp(rng.uniform(np.log(dt_range[0]), np.log(dt_range[1]), (BATCH, t, HEADS)))
  a = -rng.uniform(1.0, 16.0 if dt_range else 2.0, HEADS)
  b = rng.standard_normal((BATCH, t, groups, STATE))
  c = rng.standard_normal((BATCH, t, groups, STATE))
  d = rng.standard_normal(HEADS)
  s0 = rng.standard_normal((BATCH, HEADS, HEAD_DIM, STATE))
  return tuple(v.astype(dtype) for v in (x, dt, a, b, c, d, s0))


def loop_ssd(x, dt, a, b, c, d=None, s0=None):
  """numpy token loop: S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t + D x_t; state [B,H,P,N]."""
  bsz, t, h, p = x.shape
  r = h // b.shape[2]
  bh, ch = np.repeat(b, r, axis=2), np.repeat(c, r, axis=2)
  s = np.zeros((bsz, h, p, b.shape[-1])) if s0 is None else s0.copy()
  ys = []
  for i in range(t):
    s = np.exp(dt[:, i] * a)[..., None, None] * s + (dt[:, i, :, None] * x[:, i])[..., None] * bh[:, i, :, None, :]
    ys.append(np.einsum("bhpn,bhn->bhp", s, ch[:, i]))
  y = np.stack(ys, 1)
  if d is not None:
    y = y + d[:, None] * x
  return y, s


def dense_ssd(x, dt, a, b, c, d, s0):
  """jnp dense form from the definition: y = (L o C B^T) (dt x) + C exp(cumsum(dt A)) S_0 + D x."""
  t, h = x.shape[1], x.shape[2]
  r = h // b.shape[2]
  bh, ch = jnp.repeat(b, r, axis=2), jnp.repeat(c, r, axis=2)
  cum = jnp.cumsum(dt * a, axis=1)  # [B,T,H]
  seg = cum[:, :, None, :] - cum[:, None, :, :]  # [B,t,s,H]
  lower = (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :])[None, :, :, None]
  decay = jnp.exp(jnp.where(lower, seg, -jnp.inf))
  scores = jnp.einsum("bthn,bshn->btsh", ch, bh) * decay
  y = jnp.einsum("btsh,bshp->bthp", scores, dt[..., None] * x)
  y = y + jnp.einsum("bthn,bhpn->bthp", ch * jnp.exp(cum)[..., None], s0)
  return y + d[:, None] * x


@functools.partial(jax.jit, static_argnames=("impls",))
def _causal_forms(x, dt, a, b, c, d, s0, impls):
  """(y, final state) of each impl, all in one program."""
  return [ssd(x, dt, a, b, c, D=d, initial_state=s0, return_state=True, chunk_size=CHUNK, impl=impl)
          for impl in impls]


@pytest.mark.parametrize("groups,use_d,use_state", [(1, False, False), (2, True, True), (HEADS, True, False)])
def test_causal_forms_match_loop_float64(x64, groups, use_d, use_state):
  x, dt, a, b, c, d, s0 = make_inputs(0, groups)
  d, s0 = (d if use_d else None), (s0 if use_state else None)
  y_ref, state_ref = loop_ssd(x, dt, a, b, c, d, s0)
  impls = ("chunked", "recurrent", "reference", "auto")
  for impl, (y, state) in zip(impls, _causal_forms(x, dt, a, b, c, d, s0, impls)):
    assert y.dtype == jnp.float64 and state.shape == (BATCH, HEADS, HEAD_DIM, STATE), impl
    np.testing.assert_allclose(y, y_ref, rtol=1e-9, atol=1e-9, err_msg=impl)
    np.testing.assert_allclose(state, state_ref, rtol=1e-9, atol=1e-9, err_msg=impl)


def test_causal_float32_matches_float64_loop():
  x, dt, a, b, c, d, s0 = make_inputs(1, 2, dtype=np.float32)
  y_ref, state_ref = loop_ssd(*(v.astype(np.float64) for v in (x, dt, a, b, c, d, s0)))
  impls = ("chunked", "recurrent")
  for impl, (y, state) in zip(impls, _causal_forms(x, dt, a, b, c, d, s0, impls)):
    assert y.dtype == jnp.float32 and state.dtype == jnp.float32, impl
    np.testing.assert_allclose(y, y_ref, rtol=2e-4, atol=2e-4, err_msg=impl)
    np.testing.assert_allclose(state, state_ref, rtol=2e-4, atol=2e-4, err_msg=impl)


def test_matrix_view_is_the_dense_semiseparable_form(x64):
  x, dt, a, b, c, d, s0 = make_inputs(2, 2)
  m, dense = jax.jit(lambda *args: (ssd_matrix(*args[1:5], D=args[5]), dense_ssd(*args)))(x, dt, a, b, c, d, 0 * s0)
  assert m.shape == (BATCH, HEADS, LENGTH, LENGTH)
  np.testing.assert_allclose(np.triu(m, 1), 0.0)
  np.testing.assert_allclose(np.einsum("bhts,bshp->bthp", m, x), dense, rtol=1e-10)


def test_gradients_match_dense_form(x64):
  """Random-cotangent VJPs of the chunked form against the dense form, into every argument."""
  x, dt, a, b, c, d, s0 = make_inputs(3, 2)
  fn = lambda *args: ssd(*args[:5], D=args[5], initial_state=args[6], chunk_size=CHUNK, impl="chunked")
  cot = np.random.default_rng(4).standard_normal(x.shape)
  with_vjp = lambda f, args: (lambda out: (out[0], out[1](cot)))(jax.vjp(f, *args))
  both = jax.jit(lambda *args: (with_vjp(fn, args), with_vjp(dense_ssd, args)))  # one program
  (y, grads), (y_ref, grads_ref) = both(x, dt, a, b, c, d, s0)
  np.testing.assert_allclose(y, y_ref, rtol=1e-9, atol=1e-9)
  for name, g, g_ref in zip(["x", "dt", "A", "B", "C", "D", "initial_state"], grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=1e-8, atol=1e-8, err_msg=name)


def _sum_sq(*args):
  y = ssd(*args, chunk_size=CHUNK, impl="chunked")
  return jnp.sum(y ** 2), y


# output and gradients in one program, shared by the three step ranges (same shapes: one compile)
_value_and_grad_f32 = jax.jit(jax.value_and_grad(_sum_sq, argnums=(0, 1, 2, 3, 4), has_aux=True))


@pytest.mark.parametrize("dt_range", [(1e-4, 2e-4), (5.0, 10.0), (1e-4, 10.0)], ids=["tiny", "huge", "mixed"])
def test_extreme_steps_stay_finite_and_accurate(dt_range):
  x, dt, a, b, c, _, _ = make_inputs(5, 1, dt_range=dt_range, dtype=np.float32)
  (_, y), grads = _value_and_grad_f32(x, dt, a, b, c)
  y_ref, _ = loop_ssd(*(v.astype(np.float64) for v in (x, dt, a, b, c)))
  np.testing.assert_allclose(y, y_ref, rtol=1e-3, atol=1e-3 * np.abs(y_ref).max())
  for g in grads:
    assert np.all(np.isfinite(g))


def test_causality():
  x, dt, a, b, c, d, _ = make_inputs(6, 2, t=12, dtype=np.float32)
  jac = jax.jit(jax.jacobian(lambda x: ssd(x, dt, a, b, c, D=d, chunk_size=CHUNK, impl="chunked")))(x)
  per_pos = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 4, 6, 7))  # [t, s]
  assert np.all(np.triu(per_pos, 1) == 0)
  assert np.all(per_pos[np.tril_indices(per_pos.shape[0])] > 0)


def test_decode_steps_reproduce_the_sequence(x64):
  x, dt, a, b, c, d, s0 = make_inputs(7, 2, t=9)
  state, ys = s0, []
  step = jax.jit(ssd_step)
  for t in range(x.shape[1]):
    y_t, state = step(x[:, t], dt[:, t], a, b[:, t], c[:, t], state, D=d)
    ys.append(y_t)
  y, final = jax.jit(lambda *args: ssd(*args[:5], D=args[5], initial_state=args[6], return_state=True,
                                       chunk_size=4))(x, dt, a, b, c, d, s0)
  np.testing.assert_allclose(np.stack(ys, 1), y, rtol=1e-10)
  np.testing.assert_allclose(state, final, rtol=1e-10)


def loop_noncausal(x, dt, a, b, c, d):
  r = x.shape[2] // b.shape[2]
  bh, ch = np.repeat(b, r, axis=2), np.repeat(c, r, axis=2)
  y = np.zeros_like(x)
  for t in range(x.shape[1]):
    for s in range(x.shape[1]):
      w = np.einsum("bhn,bhn->bh", ch[:, t], bh[:, s]) * (-a * dt[:, s])
      y[:, t] += w[..., None] * x[:, s]
  return y + d[:, None] * x


@pytest.mark.parametrize("groups", [1, 2, HEADS])
def test_noncausal_matches_definition(x64, groups):
  x, dt, a, b, c, d, _ = make_inputs(8, groups, t=11)
  y_ref = loop_noncausal(x, dt, a, b, c, d)

  @jax.jit
  def forms(x, dt, a, b, c, d):
    return (ssd(x, dt, a, b, c, D=d, causal=False), ssd(x, dt, a, b, c, D=d, causal=False, impl="reference"),
            ssd_matrix(dt, a, b, c, D=d, causal=False))

  y_auto, y_reference, m = forms(x, dt, a, b, c, d)
  np.testing.assert_allclose(y_auto, y_ref, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(y_reference, y_ref, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(np.einsum("bhts,bshp->bthp", m, x), y_ref, rtol=1e-10, atol=1e-10)


def test_noncausal_every_output_depends_on_every_input_and_commutes_with_reversal():
  x, dt, a, b, c, d, _ = make_inputs(9, 2, t=10, dtype=np.float32)
  f = lambda x, dt, b, c: ssd(x, dt, a, b, c, D=d, causal=False)
  cot = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
  flip = lambda v: jnp.flip(v, 1)

  @jax.jit
  def everything(x, dt, b, c):  # one program: Jacobian, the flipped run, the output and the VJP
    y, vjp = jax.vjp(f, x, dt, b, c)
    return jax.jacobian(f)(x, dt, b, c), f(flip(x), flip(dt), flip(b), flip(c)), y, vjp(cot)

  jac, y_flipped, y, grads = everything(x, dt, b, c)
  jac = np.asarray(jac)
  assert np.all(np.abs(jac).sum(axis=(0, 2, 3, 4, 6, 7)) > 0)  # [t, s] all nonzero
  np.testing.assert_allclose(y_flipped, np.flip(y, 1), rtol=1e-5, atol=1e-5)
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in grads)


def test_bad_inputs_raise_value_errors():
  x, dt, a, b, c, d, s0 = make_inputs(10, 1, t=6, dtype=np.float32)
  with pytest.raises(ValueError, match="group count G=3"):
    ssd(x, dt, a, np.zeros((BATCH, 6, 3, STATE), np.float32), np.zeros((BATCH, 6, 3, STATE), np.float32))
  with pytest.raises(ValueError, match=r"dt must have shape \[B,T,H\]"):
    ssd(x, dt[:, :-1], a, b, c)
  with pytest.raises(ValueError, match="C must have shape"):
    ssd(x, dt, a, b, c[..., :-1])
  with pytest.raises(ValueError, match="initial_state must have shape"):
    ssd(x, dt, a, b, c, initial_state=s0[..., :-1])
  with pytest.raises(ValueError, match="D must have shape"):
    ssd(x, dt, a, b, c, D=d[:-1])
  with pytest.raises(ValueError, match="A must be <= 0"):
    ssd(x, dt, -a, b, c)
  with pytest.raises(ValueError, match="causal=True"):
    ssd(x, dt, a, b, c, causal=False, return_state=True)
  with pytest.raises(ValueError, match="impl"):
    ssd(x, dt, a, b, c, impl="cuda")
