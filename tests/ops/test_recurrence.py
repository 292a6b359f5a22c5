"""The gated linear-recurrence core: materialised matrix == token loop == chunked, gradients, causality.

Every test runs its computation as one jitted program (eager dispatch of the chunked and token-loop forms
costs far more than compiling them once)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers.ops.recurrence import gated_linear_recurrence, mixing_matrix
from tests.conftest import assert_close, random_like

B, H, K, V = 2, 3, 20, 24
DECAYS = ("none", "head", "token", "channel")


def make_inputs(t, decay, dtype=jnp.float32, seed=0, strength=1.0):
  """Drawn with numpy (eager jax.random calls compile a program per new shape)."""
  r = np.random.RandomState(seed)
  q, k, v = r.randn(B, t, H, K), r.randn(B, t, H, K), r.randn(B, t, H, V)
  shape = {"none": None, "head": (H,), "token": (B, t, H), "channel": (B, t, H, K)}[decay]
  g = None if shape is None else -strength * np.logaddexp(0.0, r.randn(*shape))  # -softplus
  s0 = r.randn(B, H, K, V)
  return tuple(None if a is None else jnp.asarray(a, dtype) for a in (q, k, v, g, s0))


def run(impl, q, k, v, g, s0, chunk=16, exclusive=False):
  return gated_linear_recurrence(q, k, v, g, scale=0.3, initial_state=s0, exclusive=exclusive,
                                 chunk_size=chunk, impl=impl)


@functools.partial(jax.jit, static_argnames=("forms",))
def run_forms(q, k, v, g, s0, forms):
  """(output, state) of each (impl, chunk, exclusive) in `forms`, all in one program."""
  return [run(impl, q, k, v, g, s0, chunk, exclusive) for impl, chunk, exclusive in forms]


FORMS64 = (("reference", 16, False), ("recurrent", 16, False), ("chunked", 16, False), ("chunked", 64, False))
EXCLUSIVE = (("chunked", 16, True), ("recurrent", 16, True))
FORMS32 = (("reference", 16, False), ("recurrent", 16, False), ("chunked", 64, False))
CHUNKS = (16, 128, 256)
# At T=37 (float64) the exclusive forms and the VJPs join the program, and for per-channel decay at T=100
# (float32) the chunk sizes do: the exclusive, gradient and chunk-size tests then reuse those compiled programs.
FORMS64_37 = FORMS64 + EXCLUSIVE
FORMS32_CHANNEL = FORMS32 + tuple(("chunked", c, False) for c in CHUNKS)
GRAD_IMPLS = ("reference", "recurrent", "chunked")


@jax.jit
def _forms_and_vjps_37(args, cot):
  """The FORMS64_37 (output, state) pairs and the VJPs of GRAD_IMPLS (chunks of 16) against one cotangent, in
  one program: the VJPs' forward passes are those forms' outputs."""
  outs, vjps = {}, []
  for impl in GRAD_IMPLS:
    outs[(impl, 16, False)], vjp = jax.vjp(functools.partial(run, impl), *args)
    vjps.append(vjp(cot))
  for impl, chunk, exclusive in FORMS64_37:
    if (impl, chunk, exclusive) not in outs:
      outs[(impl, chunk, exclusive)] = run(impl, *args, chunk, exclusive)
  return [outs[f] for f in FORMS64_37], vjps


def forms_and_vjps_37(decay):
  """(inputs, cotangent, FORMS64_37 outputs, VJPs of GRAD_IMPLS) at T=37, float64."""
  args = make_inputs(37, decay, jnp.float64)
  cot = random_like(jax.random.key(7), jax.eval_shape(functools.partial(run, "reference"), *args))
  return (args, cot) + tuple(_forms_and_vjps_37(args, cot))


@pytest.mark.parametrize("t", [1, 37, 100])
@pytest.mark.parametrize("decay", DECAYS)
def test_forms_agree_float64(x64, t, decay):
  if t == 37:
    (o_ref, s_ref), *rest = forms_and_vjps_37(decay)[2]
  else:
    (o_ref, s_ref), *rest = run_forms(*make_inputs(t, decay, jnp.float64), FORMS64)
  for (impl, chunk, _), (o, s) in zip(FORMS64[1:], rest):
    assert o.dtype == jnp.float64 and s.dtype == jnp.float64
    assert_close(o, o_ref, 1e-12, f"{impl}/{chunk} output")
    assert_close(s, s_ref, 1e-12, f"{impl}/{chunk} state")


@pytest.mark.parametrize("decay", DECAYS)
def test_exclusive_reads_state_before_own_write(x64, decay):
  (q, k, v, _, _), _, forms, _ = forms_and_vjps_37(decay)
  outs = dict(zip(FORMS64_37, forms))
  o_incl, _ = outs[("reference", 16, False)]
  (o_excl, s_excl), (o_rec, s_rec) = (outs[f] for f in EXCLUSIVE)
  own = 0.3 * np.einsum("bthk,bthk->bth", q, k)[..., None] * np.asarray(v)
  assert_close(o_excl, o_incl - own, 1e-12, "exclusive = inclusive - own token")
  assert_close(o_rec, o_excl, 1e-12)
  assert_close(s_rec, s_excl, 1e-12)


@pytest.mark.parametrize("decay", DECAYS)
def test_forms_agree_float32(decay):
  q, k, v, g, s0 = make_inputs(100, decay)
  forms = FORMS32_CHANNEL if decay == "channel" else FORMS32
  (o_ref, s_ref), *rest = run_forms(q, k, v, g, s0, forms)
  for (impl, _, _), (o, s) in zip(FORMS32[1:], rest):
    assert o.dtype == jnp.float32
    assert_close(o, o_ref, 2e-6, impl)
    assert_close(s, s_ref, 2e-6, impl)


def test_mixing_matrix_against_explicit_loop(x64):
  q, k, _, g, _ = make_inputs(9, "channel", jnp.float64)
  m = jax.jit(functools.partial(mixing_matrix, scale=0.5))(q, k, g)
  qn, kn, gn = (np.asarray(a) for a in (q, k, g))
  expected = np.zeros((B, H, 9, 9))
  for t in range(9):
    for s in range(t + 1):
      w = np.exp(gn[:, s + 1:t + 1].sum(axis=1))  # decay over (s, t], [B,H,K]
      expected[:, :, t, s] = 0.5 * np.sum(qn[:, t] * kn[:, s] * w, axis=-1)
  assert_close(m, expected, 1e-13)


@pytest.mark.parametrize("decay", DECAYS)
def test_gradients_match_reference(x64, decay):
  """Random-cotangent VJPs into q, k, v, log_decay and the initial state."""
  args, _, _, (grads_ref, *rest) = forms_and_vjps_37(decay)
  argnums = tuple(i for i, a in enumerate(args) if a is not None and a.ndim > 1)
  for impl, grads in zip(GRAD_IMPLS[1:], rest):
    for i in argnums:
      assert_close(grads[i], grads_ref[i], 1e-11, f"{impl} grad of arg {i}")
  if decay == "head":  # a per-head [H] decay gets the sum over batch and time
    assert grads_ref[3].shape == (H,)


def test_check_grads_chunked(x64):
  """The check of `jax.test_util.check_grads(order=1, modes=("rev",))`, in one program: for random tangents t
  and cotangents c, <vjp(c), t> equals <c, (f(x + eps t) - f(x - eps t)) / (2 eps)> (central differences)."""
  args = make_inputs(19, "channel", jnp.float64, seed=2)
  f = lambda *a: run("chunked", *a)
  eps = 1e-4  # check_grads' step
  tangent = random_like(jax.random.key(3), args)
  cot = random_like(jax.random.key(4), jax.eval_shape(f, *args))
  inner = lambda a, b: sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  @jax.jit
  def both(args, tangent, cot):
    _, vjp = jax.vjp(f, *args)
    plus = f(*(a + eps * t for a, t in zip(args, tangent)))
    minus = f(*(a - eps * t for a, t in zip(args, tangent)))
    numerical = jax.tree.map(lambda p, m: (p - m) * (0.5 / eps), plus, minus)
    return inner(vjp(cot), tangent), inner(cot, numerical)

  ip, ip_expected = both(args, tangent, cot)
  np.testing.assert_allclose(ip, ip_expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("decay", ["none", "channel"])
def test_causality(decay):
  q, k, v, g, s0 = make_inputs(50, decay)
  t = 23

  @jax.jit
  def both(q, k, v, g, s0):
    q2, k2, v2 = (a.at[:, t + 1:].set(a[:, t + 1:] * 3 + 1) for a in (q, k, v))
    g2 = None if g is None else g.at[:, t + 1:].set(-5.0)
    return run("chunked", q, k, v, g, s0)[0], run("chunked", q2, k2, v2, g2, s0)[0]

  o1, o2 = both(q, k, v, g, s0)
  np.testing.assert_array_equal(o1[:, :t + 1], o2[:, :t + 1])
  assert not np.allclose(o1[:, t + 1:], o2[:, t + 1:])


@pytest.mark.parametrize("decay", ["token", "channel"])
def test_state_split_and_resume(x64, decay):
  q, k, v, g, s0 = make_inputs(37, decay, jnp.float64)
  t1 = 20

  @jax.jit
  def whole_and_split(q, k, v, g, s0):
    o, s = run("chunked", q, k, v, g, s0)
    o1, s1 = run("chunked", q[:, :t1], k[:, :t1], v[:, :t1], g[:, :t1], s0)
    o2, s2 = run("chunked", q[:, t1:], k[:, t1:], v[:, t1:], g[:, t1:], s1)
    return o, s, jnp.concatenate([o1, o2], axis=1), s2

  o, s, o_split, s2 = whole_and_split(q, k, v, g, s0)
  assert_close(o_split, o, 1e-12)
  assert_close(s2, s, 1e-12)


def test_bf16_long_sequence_with_strong_gates():
  """bf16 inputs, T=4096, log-decays as strong as -20: finite, and within 2e-2 of the fp32 result."""
  t = 4096
  q, k, v, _, _ = (np.asarray(a)[:1, :, :1] if a is not None else a for a in make_inputs(t, "none"))
  g = np.full(q.shape, -20.0, np.float32)
  g[:, ::7] = -1e-3
  f = lambda q, k, v, g: gated_linear_recurrence(q, k, v, g, scale=0.3, chunk_size=64)

  @jax.jit
  def both(q, k, v, g):
    out32 = f(q, k, v, g)
    out16 = f(*(a.astype(jnp.bfloat16) for a in (q, k, v)), g)
    grads = jax.grad(lambda g: jnp.sum(f(q, k, v, g)[0]))(g)
    return out32, out16, grads

  (o32, s32), (o16, s16), grads = both(q, k, v, g)
  assert o16.dtype == jnp.bfloat16 and s16.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(o16, np.float32))) and np.all(np.isfinite(np.asarray(s16)))
  assert_close(o16, o32, 2e-2, "bf16 vs fp32 output")
  assert_close(s16, s32, 2e-2, "bf16 vs fp32 state")
  assert np.all(np.isfinite(np.asarray(grads)))


def test_chunk_sizes():
  """Chunks smaller than T (not dividing it) and larger than T (128, 256) against the reference form, float32
  (the program of test_forms_agree_float32[channel])."""
  q, k, v, g, s0 = make_inputs(100, "channel")
  outs = dict(zip(FORMS32_CHANNEL, run_forms(q, k, v, g, s0, FORMS32_CHANNEL)))
  o_ref, s_ref = outs[("reference", 16, False)]
  for chunk in CHUNKS:
    o, s = outs[("chunked", chunk, False)]
    assert_close(o, o_ref, 2e-6, f"chunk {chunk}")
    assert_close(s, s_ref, 2e-6, f"chunk {chunk}")


@pytest.mark.parametrize("bad, match", [
    (dict(q=jnp.zeros((2, 5, 3))), "q must have shape"),
    (dict(k=jnp.zeros((2, 5, 3, 7))), "k must have shape"),
    (dict(v=jnp.zeros((2, 6, 3, 4))), "v must have shape"),
    (dict(log_decay=jnp.zeros((2, 5))), "log_decay must have shape"),
    (dict(log_decay=jnp.full((2, 5, 3), 0.5)), "log_decay must be <= 0"),
    (dict(initial_state=jnp.zeros((2, 3, 4, 5))), "initial_state must have shape"),
    (dict(chunk_size=-16), "chunk_size must be a positive integer"),
    (dict(chunk_size=0), "chunk_size must be a positive integer"),
    (dict(impl="cuda"), "impl must be one of"),
])
def test_bad_input(bad, match):
  args = dict(q=jnp.zeros((2, 5, 3, 4)), k=jnp.zeros((2, 5, 3, 4)), v=jnp.zeros((2, 5, 3, 6)))
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    gated_linear_recurrence(**args)
