"""delta_rule: chunked == recurrent == the float64 token loop (odd shapes, gates, initial states), gradients,
causality, the decode step, bf16 at length 2048, and the refused inputs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers import ops
from tests.conftest import assert_close

B, H, K, V = 1, 2, 12, 20


def _inputs(t, seed=0, dtype=np.float64, beta_range=(0.0, 1.0), b=B):
  """q, k (unit norm, as the layers give them), v, beta, log_decay, initial state."""
  r = np.random.RandomState(seed)
  q, k = r.randn(b, t, H, K), r.randn(b, t, H, K)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  v = r.randn(b, t, H, V)
  lo, hi = beta_range
  beta = lo + (hi - lo) * r.rand(b, t, H)
  g = -0.2 * r.rand(b, t, H)
  s0 = r.randn(b, H, K, V)
  return tuple(jnp.asarray(a, dtype) for a in (q, k, v, beta, g, s0))


@functools.lru_cache(maxsize=None)
def _fn(impl, chunk, gated, with_state):
  def f(q, k, v, beta, g, s0):
    return ops.delta_rule(q, k, v, beta, log_decay=g if gated else None, initial_state=s0 if with_state else None,
                          return_state=True, impl=impl, chunk_size=chunk)
  return jax.jit(f)


FORMS = [("recurrent", 64), ("chunked", 16), ("chunked", 64)]
CONFIGS = [(True, True), (False, False)]  # (gated, with_state)


@jax.jit
def _all_forms(*args):
  """{(gated, with_state): (reference, [each of FORMS])}: every form and configuration in one program."""
  return {cfg: (_fn("reference", 64, *cfg)(*args), [_fn(impl, chunk, *cfg)(*args) for impl, chunk in FORMS])
          for cfg in CONFIGS}


@pytest.mark.parametrize("t", [1, 37, 100])
def test_forms_equal_the_token_loop_in_float64(x64, t):
  args = _inputs(t)
  for (gated, with_state), (want, outs) in _all_forms(*args).items():
    for (impl, chunk), (o, s) in zip(FORMS, outs):
      what = f"{impl}/{chunk} gated={gated} state={with_state}"
      assert o.shape == (B, t, H, V) and s.shape == (B, H, K, V), what
      assert_close(o, want[0], 1e-12, what + " o")
      assert_close(s, want[1], 1e-12, what + " state")


def test_float32_chunked_within_1e5_of_float64(x64):
  args = _inputs(100, seed=1)
  both = jax.jit(lambda a64, a32: (_fn("reference", 64, True, True)(*a64), _fn("chunked", 64, True, True)(*a32)))
  want, got = both(args, tuple(a.astype(jnp.float32) for a in args))
  assert got[0].dtype == jnp.float32 and got[1].dtype == jnp.float32
  assert_close(got[0], want[0], 1e-5, "o")
  assert_close(got[1], want[1], 1e-5, "state")


def test_gradients_match_the_token_loop(x64):
  """Random cotangents on o and the final state; gradients into q, k, v, beta, log_decay and the initial state."""
  args = _inputs(37, seed=2)
  r = np.random.RandomState(3)
  cot_o, cot_s = jnp.asarray(r.randn(B, 37, H, V)), jnp.asarray(r.randn(B, H, K, V))

  def grads(impl, chunk, args):
    loss = lambda *a: (lambda o, s: jnp.sum(o * cot_o) + jnp.sum(s * cot_s))(*_fn(impl, chunk, True, True)(*a))
    return jax.grad(loss, argnums=tuple(range(6)))(*args)

  forms = [("reference", 64), ("recurrent", 64), ("chunked", 16)]
  want, *rest = jax.jit(lambda *a: [grads(impl, chunk, a) for impl, chunk in forms])(*args)  # one program
  for (impl, _), got_grads in zip(forms[1:], rest):
    for name, got, ref in zip(("q", "k", "v", "beta", "log_decay", "initial_state"), got_grads, want):
      assert got.shape == ref.shape
      assert_close(got, ref, 1e-10, f"{impl} d{name}")


def test_causal():
  """Changing every input after token t changes no output up to t."""
  t = 20
  args = _inputs(37, seed=4, dtype=np.float32)
  other = _inputs(37, seed=5, dtype=np.float32)
  mixed = tuple(np.concatenate([np.asarray(a)[:, :t + 1], np.asarray(b)[:, t + 1:]], axis=1)
                for a, b in zip(args[:5], other[:5]))
  f = _fn("chunked", 16, True, True)
  o1, o2 = f(*args)[0], f(*mixed, args[5])[0]
  np.testing.assert_array_equal(o1[:, :t + 1], o2[:, :t + 1])
  assert not np.allclose(o1[:, t + 1:], o2[:, t + 1:])


def test_decode_step_equals_forward():
  q, k, v, beta, g, s0 = _inputs(13, seed=6, dtype=np.float32)
  step = jax.jit(lambda q, k, v, beta, g, s: ops.delta_rule_step(q, k, v, beta, s, log_decay=g))
  state, outs = s0, []
  for i in range(13):
    o, state = step(q[:, i], k[:, i], v[:, i], beta[:, i], g[:, i], state)
    outs.append(o)
  want_o, want_s = _fn("chunked", 64, True, True)(q, k, v, beta, g, s0)
  assert_close(jnp.stack(outs, axis=1), want_o, 1e-5, "o")
  assert_close(state, want_s, 1e-5, "state")


def test_bfloat16_long_sequence_with_beta_near_one():
  """T = 2048, no gate (nothing forgets), beta in (0.95, 1): bf16 inputs stay finite and within 1e-2 (relative
  RMS; measured 4.5e-3 for o, 3.5e-3 for the state) of float32 on the unrounded inputs; the state is float32."""
  q, k, v, beta, _, _ = _inputs(2048, seed=7, dtype=np.float32, beta_range=(0.95, 1.0))
  f = lambda *a: ops.delta_rule(*a, return_state=True)
  both = jax.jit(lambda *a: (f(*(u.astype(jnp.bfloat16) for u in a)), f(*a)))  # one program
  (o, s), (want_o, want_s) = both(q, k, v, beta)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(o, np.float32))) and np.all(np.isfinite(np.asarray(s)))
  assert_close(np.asarray(o, np.float32), want_o, 1e-2, "bf16 o")
  assert_close(s, want_s, 1e-2, "bf16 state")


@pytest.mark.parametrize("b,t", [(0, 8), (2, 0)])
def test_empty_batch_and_sequence(b, t):
  q, k, v, beta, g, _ = _inputs(t, dtype=np.float32, b=b)
  s0 = np.full((b, H, K, V), 0.5, np.float32)
  o, s = jax.jit(lambda *a: ops.delta_rule(*a[:4], log_decay=a[4], initial_state=a[5], return_state=True))(
      q, k, v, beta, g, s0)
  assert o.shape == (b, t, H, V) and o.dtype == jnp.float32
  np.testing.assert_array_equal(s, s0)


def test_bad_inputs_are_refused_by_name():
  q, k, v, beta, g, _ = (np.asarray(a) for a in _inputs(8, dtype=np.float32))  # numpy: no eager slicing programs
  with pytest.raises(ValueError, match="beta must have shape"):
    ops.delta_rule(q, k, v, beta[..., 0])
  with pytest.raises(ValueError, match="log_decay must have shape"):
    ops.delta_rule(q, k, v, beta, log_decay=g[0])
  with pytest.raises(ValueError, match="log_decay must be <= 0"):
    ops.delta_rule(q, k, v, beta, log_decay=-g)
  with pytest.raises(ValueError, match="beta must be a floating-point array"):
    ops.delta_rule(q, k, v, beta.astype(jnp.int32))
  with pytest.raises(ValueError, match="impl must be one of"):
    ops.delta_rule(q, k, v, beta, impl="triton")
  with pytest.raises(ValueError, match="state must have shape"):
    ops.delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], jnp.zeros((B, H, K, K)))
  # Under jit a positive log-decay is NaN from its chunk on (chunks of 4: token 5 reaches tokens 4 to 7).
  g_bad = np.array(g)
  g_bad[:, 5] = 0.5
  nan = jax.jit(lambda g: ops.delta_rule(q, k, v, beta, log_decay=g, chunk_size=4))(g_bad)
  assert np.all(np.isnan(np.asarray(nan)[:, 5:])) and np.all(np.isfinite(np.asarray(nan)[:, :4]))


def test_substitution_solve_equals_solve_triangular_with_gradients(x64):
  """The CPU solve (forward substitution, own VJP) against `jax.scipy.linalg.solve_triangular` (accelerators)."""
  from mixers.ops.delta_chunked import unit_lower_solve  # pylint: disable=import-outside-toplevel
  r = np.random.RandomState(8)
  a, rhs, cot = (jnp.asarray(s * r.randn(2, 3, 9, w)) for s, w in ((0.5, 9), (1.0, 5), (1.0, 5)))
  lapack = lambda a, rhs: jax.scipy.linalg.solve_triangular(jnp.tril(a, -1) + jnp.eye(9), rhs, lower=True,
                                                            unit_diagonal=True)
  run = lambda solve, a, rhs: jax.tree.leaves(jax.value_and_grad(lambda *z: jnp.sum(solve(*z) * cot),
                                                                argnums=(0, 1))(a, rhs))
  got, want = jax.jit(lambda a, rhs: (run(unit_lower_solve, a, rhs), run(lapack, a, rhs)))(a, rhs)
  for got, want in zip(got, want):
    assert_close(got, want, 1e-12, "solve")
