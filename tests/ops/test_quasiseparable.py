"""quasiseparable (Hydra) against its definition from two causal SSDs, a dense loop, and padded batches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers.ops.quasiseparable import quasiseparable, quasiseparable_matrix
from mixers.ops.ssd import ssd

BATCH, LENGTH, HEADS, HEAD_DIM, STATE = 2, 19, 4, 3, 5
CHUNK = 8


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def make_inputs(seed, groups=2, *, t=LENGTH, per_token_d=True, dtype=np.float64):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((BATCH, t, HEADS, HEAD_DIM))
  dt = tuple(np.log1p(np.exp(rng.standard_normal((BATCH, t, HEADS)))) for _ in range(2))
  a = -rng.uniform(0.5, 2.0, HEADS)
  b = tuple(rng.standard_normal((BATCH, t, groups, STATE)) for _ in range(2))
  c = tuple(rng.standard_normal((BATCH, t, groups, STATE)) for _ in range(2))
  d = rng.standard_normal((BATCH, t, HEADS) if per_token_d else (HEADS,))
  cast = lambda v: tuple(u.astype(dtype) for u in v) if isinstance(v, tuple) else v.astype(dtype)
  return tuple(cast(v) for v in (x, dt, a, b, c, d))


def from_two_ssds(x, dt, a, b, c, d):
  """shift(SS(x)) + flip(shift(SS(flip x))) + D x, with two separate causal ssd calls."""
  flip = lambda v: jnp.flip(v, 1)
  shift = lambda u: jnp.concatenate([jnp.zeros_like(u[:, :1]), u[:, :-1]], axis=1)
  fwd = ssd(x, dt[0], a, b[0], c[0], impl="recurrent")
  bwd = ssd(flip(x), flip(dt[1]), a, flip(b[1]), flip(c[1]), impl="recurrent")
  d = jnp.broadcast_to(d, x.shape[:3])
  return shift(fwd) + flip(shift(bwd)) + d[..., None] * x


def dense_loop(dt, a, b, c, d):
  """M [B,H,T,T] entry by entry from the contract's formula."""
  bsz, t, h = dt[0].shape
  r = h // b[0].shape[2]
  rep = lambda v: np.repeat(v, r, axis=2)
  bf, bb, cf, cb = rep(b[0]), rep(b[1]), rep(c[0]), rep(c[1])
  af, ab = np.exp(dt[0] * a), np.exp(dt[1] * a)
  m = np.zeros((bsz, h, t, t))
  for i in range(t):
    for s in range(t):
      if s < i:
        m[:, :, i, s] = (np.einsum("bhn,bhn->bh", cf[:, i - 1], bf[:, s]) * dt[0][:, s]
                         * np.prod(af[:, s + 1:i], axis=1))
      elif s > i:
        m[:, :, i, s] = (np.einsum("bhn,bhn->bh", cb[:, i + 1], bb[:, s]) * dt[1][:, s]
                         * np.prod(ab[:, i + 1:s], axis=1))
      else:
        m[:, :, i, s] = np.broadcast_to(d, (bsz, t, h))[:, i]
  return m


@pytest.mark.parametrize("groups,per_token_d", [(1, False), (2, True), (HEADS, True)])
def test_matches_two_ssds_and_dense_matrix(x64, groups, per_token_d):
  x, dt, a, b, c, d = make_inputs(0, groups, per_token_d=per_token_d)
  m_ref = dense_loop(dt, a, b, c, d)
  y_ref = np.einsum("bhts,bshp->bthp", m_ref, x)
  impls = ("chunked", "recurrent", "reference")

  @jax.jit
  def forms(x, dt, a, b, c, d):  # one program for the two-SSD form, the matrix and every impl
    return (from_two_ssds(x, dt, a, b, c, d), quasiseparable_matrix(dt, a, b, c, D=d),
            [quasiseparable(x, dt, a, b, c, D=d, chunk_size=CHUNK, impl=impl) for impl in impls])

  y_two, m, ys = forms(x, dt, a, b, c, d)
  np.testing.assert_allclose(y_two, y_ref, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(m, m_ref, rtol=1e-10, atol=1e-12)
  for impl, y in zip(impls, ys):
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10, err_msg=impl)


def test_float32_and_gradients_match_two_ssds():
  x, dt, a, b, c, d = make_inputs(1, dtype=np.float32)
  fast = jax.jit(lambda *v: quasiseparable(*v[:5], D=v[5], chunk_size=CHUNK, impl="chunked"))
  cot = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
  with_vjp = lambda f: jax.jit(lambda cot, *args: (lambda out: (out[0], out[1](cot)))(jax.vjp(f, *args)))
  y, grads = with_vjp(fast)(cot, x, dt, a, b, c, d)
  with jax.enable_x64(True):
    f64 = lambda v: jax.tree.map(lambda u: np.asarray(u, np.float64), v)
    y_ref, grads_ref = with_vjp(from_two_ssds)(*f64((cot, x, dt, a, b, c, d)))
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
  for name, g, g_ref in zip(["x", "dt", "A", "B", "C", "D"], jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-3, atol=1e-3 * np.abs(g_ref).max(), err_msg=name)


def test_padded_batch_equals_sequences_run_one_by_one(x64):
  """Right-padded and left-padded tokens (with huge values) change nothing on the real tokens."""
  x, dt, a, b, c, d = make_inputs(3)
  lengths = np.array([LENGTH, 11])
  garbage = lambda v, keep: np.where(keep, v, 1e3)
  keep = np.arange(LENGTH)[None, :] < lengths[:, None]
  k4 = keep[..., None, None]
  xp = garbage(x, k4)
  dtp = tuple(garbage(v, keep[..., None]) for v in dt)
  bp, cp = (tuple(garbage(u, k4) for u in v) for v in (b, c))
  # Left padding: the second sequence's real tokens sit at the end.
  shift = LENGTH - lengths[1]
  roll = lambda v: jax.tree.map(lambda u: np.concatenate([u[:1], np.roll(u[1:], shift, axis=1)]), v)
  keep_left = np.stack([keep[0], np.roll(keep[1], shift)])
  static_lengths = tuple(int(n) for n in lengths)  # the one-by-one runs slice by them

  @jax.jit
  def everything(x, dt, a, b, c, d, xp, dtp, bp, cp, lengths, keep, left, keep_left):  # one program
    y = quasiseparable(xp, dtp, a, bp, cp, D=d, lengths=lengths, chunk_size=CHUNK, impl="chunked")
    y_mask = quasiseparable(xp, dtp, a, bp, cp, D=d, mask=keep, chunk_size=CHUNK, impl="chunked")
    y_ones = []
    for i, n in enumerate(static_lengths):
      one = lambda v: jax.tree.map(lambda u: u[i:i + 1, :n], v)  # pylint: disable=cell-var-from-loop
      y_ones.append(quasiseparable(*one((x, dt)), a, *one((b, c)), D=one(d), chunk_size=CHUNK, impl="chunked"))
    xl, dtl, bl, cl, dl = left
    y_left = quasiseparable(xl, dtl, a, bl, cl, D=dl, mask=keep_left, chunk_size=CHUNK)
    m = quasiseparable_matrix(dtp, a, bp, cp, D=d, lengths=lengths)
    return y, y_mask, y_ones, y_left, m

  y, y_mask, y_ones, y_left, m = everything(x, dt, a, b, c, d, xp, dtp, bp, cp, lengths, keep,
                                            roll((xp, dtp, bp, cp, d)), keep_left)
  np.testing.assert_allclose(y_mask, y, rtol=1e-12)
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(y[i:i + 1, :n], y_ones[i], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y[i, n:], 0.0)
  np.testing.assert_allclose(y_left[1, shift:], y[1, :lengths[1]], rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(np.einsum("bhts,bshp->bthp", m, np.where(k4, xp, 0)), y, rtol=1e-10, atol=1e-10)


_jac = jax.jit(jax.jacobian(lambda x, dt, a, b, c, d: quasiseparable(x, dt, a, b, c, D=d, chunk_size=CHUNK)))


def test_every_output_depends_on_every_input_and_reversal_swaps_directions():
  x, dt, a, b, c, d = make_inputs(4, t=12, dtype=np.float32)
  jac = np.asarray(_jac(x, dt, a, b, c, d))
  assert np.all(np.abs(jac).sum(axis=(0, 2, 3, 4, 6, 7)) > 0)  # [t, s] all nonzero
  flip = lambda v: jax.tree.map(lambda u: jnp.flip(u, 1), v)
  swap = lambda v: (v[1], v[0])
  y, y_rev = jax.jit(lambda x, dt, a, b, c, d: (
      quasiseparable(x, dt, a, b, c, D=d, chunk_size=CHUNK),
      quasiseparable(flip(x), swap(flip(dt)), a, swap(flip(b)), swap(flip(c)), D=flip(d), chunk_size=CHUNK)))(
          x, dt, a, b, c, d)
  np.testing.assert_allclose(y_rev, flip(y), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_value_errors():
  x, dt, a, b, c, d = make_inputs(5, t=6, dtype=np.float32)
  with pytest.raises(ValueError, match=r"dt must be a pair"):
    quasiseparable(x, dt[0], a, b, c)
  with pytest.raises(ValueError, match=r"B\[1\] \(backward\) must have shape"):
    quasiseparable(x, dt, a, (b[0], b[1][:, :-1]), c)
  with pytest.raises(ValueError, match="D must have shape"):
    quasiseparable(x, dt, a, b, c, D=d[:, :-1])
  with pytest.raises(ValueError, match="lengths must have shape"):
    quasiseparable(x, dt, a, b, c, lengths=np.array([3]))
  with pytest.raises(ValueError, match="mask or lengths"):
    quasiseparable(x, dt, a, b, c, lengths=np.array([3, 3]), mask=np.ones((BATCH, 6), bool))
