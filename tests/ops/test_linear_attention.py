"""linear_attention and its decode step against explicit float64 formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers import ops
from tests.conftest import assert_close

B, T, H, K, V = 2, 37, 3, 20, 24


def inputs(dtype=jnp.float64, decay="channel", seed=0):
  """Drawn with numpy (eager jax calls compile a program per new shape); q, k through elu + 1."""
  r = np.random.RandomState(seed)
  elu_plus_one = lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
  q, k = (elu_plus_one(r.randn(B, T, H, K)) for _ in range(2))
  v = r.randn(B, T, H, V)
  shape = {"none": None, "head": (H,), "token": (B, T, H), "channel": (B, T, H, K)}[decay]
  g = None if shape is None else -0.3 * np.logaddexp(0.0, r.randn(*shape))  # -softplus
  return tuple(None if a is None else jnp.asarray(a, dtype) for a in (q, k, v, g))


def explicit(q, k, v, g, *, causal, normalize, scale, eps=1e-6):
  """o_t = scale sum_s q_t^T diag(w_ts) k_s v_s (/ scale sum_s q_t^T diag(w_ts) k_s + eps), with numpy loops."""
  q, k, v = (np.asarray(a) for a in (q, k, v))
  g = np.zeros(q.shape) if g is None else np.broadcast_to(np.asarray(g).reshape(
      np.asarray(g).shape + (1,) * (4 - np.asarray(g).ndim)) if np.asarray(g).ndim != 1 else np.asarray(g)[:, None],
      q.shape)
  cum = np.cumsum(g, axis=1)
  o = np.zeros(v.shape)
  for t in range(q.shape[1]):
    s_range = range(t + 1) if causal else range(q.shape[1])
    num, den = 0, 0
    for s in s_range:
      w = np.exp(-np.abs(cum[:, t] - cum[:, s]))  # decay over the interval between s and t
      a = scale * np.sum(q[:, t] * k[:, s] * w, axis=-1)  # [B,H]
      num = num + a[..., None] * v[:, s]
      den = den + a
    o[:, t] = num / (den[..., None] + eps) if normalize else num
  return o


@jax.jit
def _all_variants(q, k, v, g):
  """Causal and not, normalised and not: the four forms in one program."""
  return {(causal, normalize): ops.linear_attention(q, k, v, causal=causal, log_decay=g, normalize=normalize,
                                                    chunk_size=16)
          for causal in (True, False) for normalize in (False, True)}


@pytest.mark.parametrize("decay", ["none", "head", "channel"])
def test_against_explicit_formula(x64, decay):
  q, k, v, g = inputs(decay=decay)
  for (causal, normalize), o in _all_variants(q, k, v, g).items():
    assert_close(o, explicit(q, k, v, g, causal=causal, normalize=normalize, scale=K ** -0.5), 1e-12,
                 f"causal={causal} normalize={normalize}")


@pytest.mark.parametrize("normalize", [False, True])
def test_step_equals_full_sequence(x64, normalize):
  q, k, v, g = inputs(decay="token")
  o, state = jax.jit(lambda q, k, v, g: ops.linear_attention(q, k, v, log_decay=g, normalize=normalize,
                                                             return_state=True, chunk_size=16))(q, k, v, g)
  s = jnp.zeros((B, H, K, V))
  s = (s, jnp.zeros((B, H, K))) if normalize else s
  step = jax.jit(lambda q, k, v, s, g: ops.linear_attention_step(q, k, v, s, log_decay=g, normalize=normalize))
  outs = []
  for t in range(T):
    ot, s = step(q[:, t], k[:, t], v[:, t], s, g[:, t])
    outs.append(ot)
  assert_close(jnp.stack(outs, axis=1), o, 1e-12)
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(state)):
    assert_close(a, b, 1e-12)


def test_normalized_resume_from_pair_state(x64):
  q, k, v, g = inputs(decay="channel")
  t1 = 15

  @jax.jit
  def whole_and_split(q, k, v, g):
    o = ops.linear_attention(q, k, v, log_decay=g, normalize=True, chunk_size=16)
    o1, st = ops.linear_attention(q[:, :t1], k[:, :t1], v[:, :t1], log_decay=g[:, :t1], normalize=True,
                                  return_state=True)
    o2 = ops.linear_attention(q[:, t1:], k[:, t1:], v[:, t1:], log_decay=g[:, t1:], normalize=True,
                              initial_state=st)
    return o, o1, st, o2

  o, o1, st, o2 = whole_and_split(q, k, v, g)
  assert isinstance(st, tuple) and st[0].shape == (B, H, K, V) and st[1].shape == (B, H, K)
  assert_close(jnp.concatenate([o1, o2], axis=1), o, 1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_normalized_key_gradient(x64, causal):
  """The key gradient of normalised linear attention flows through numerator and denominator alike."""
  q, k, v, _ = inputs(decay="none", seed=3)
  scale = K ** -0.5

  def direct(q, k, v):  # o = (M v) / (M 1 + eps), M the (masked) score matrix
    m = scale * jnp.einsum("bthk,bshk->bhts", q, k)
    if causal:
      m = jnp.where(jnp.tril(jnp.ones((T, T), bool)), m, 0)
    return jnp.einsum("bhts,bshv->bthv", m, v) / (jnp.einsum("bhts->bth", m)[..., None] + 1e-6)

  f = lambda q, k, v: ops.linear_attention(q, k, v, causal=causal, normalize=True, chunk_size=16)
  cot = jnp.asarray(np.random.RandomState(5).randn(B, T, H, V))

  @jax.jit
  def both(q, k, v):  # outputs and VJPs of the op and of the direct form, one program
    out, vjp = jax.vjp(f, q, k, v)
    out_ref, vjp_ref = jax.vjp(direct, q, k, v)
    return out, out_ref, vjp(cot), vjp_ref(cot)

  out, out_ref, grads, grads_ref = both(q, k, v)
  assert_close(out, out_ref, 1e-12)
  for name, a, b in zip("qkv", grads, grads_ref):
    assert_close(a, b, 1e-11, f"d{name}")


def test_causality_normalized_with_decay():
  q, k, v, g = inputs(jnp.float32, decay="channel")
  t = 11
  f = lambda q, k, v: ops.linear_attention(q, k, v, log_decay=g, normalize=True, chunk_size=16)
  o1, o2 = jax.jit(lambda q, k, v: (f(q, k, v), f(q.at[:, t + 1:].add(1.0), k.at[:, t + 1:].add(1.0),
                                                    v.at[:, t + 1:].add(1.0))))(q, k, v)
  np.testing.assert_array_equal(o1[:, :t + 1], o2[:, :t + 1])


def test_noncausal_no_decay_is_two_matmuls():
  """Without decay the non-causal form builds the K x V state once: no T x T or chunk structure."""
  q, k, v, _ = inputs(jnp.float32, decay="none")
  jaxpr = jax.make_jaxpr(lambda q, k, v: ops.linear_attention(q, k, v, causal=False))(q, k, v)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 2
  assert not any(e.primitive.name == "scan" for e in jaxpr.jaxpr.eqns)


def test_bad_input():
  q, k, v, g = inputs(jnp.float32, decay="none")
  with pytest.raises(ValueError, match="initial_state and return_state need causal=True"):
    ops.linear_attention(q, k, v, causal=False, return_state=True)
  with pytest.raises(ValueError, match="pair"):
    ops.linear_attention(q, k, v, normalize=True, initial_state=jnp.zeros((B, H, K, V)))
  with pytest.raises(ValueError, match=r"state\[1\] \(z\) must have shape"):
    ops.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], (jnp.zeros((B, H, K, V)), jnp.zeros((B, H))),
                              normalize=True)
  with pytest.raises(ValueError, match="log_decay must be <= 0"):
    ops.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], jnp.zeros((B, H, K, V)), log_decay=jnp.ones((H,)))
  with pytest.raises(ValueError, match="chunk_size"):
    ops.linear_attention(q, k, v, chunk_size=-1)
