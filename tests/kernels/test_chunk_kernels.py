"""Pallas chunked-recurrence kernels (interpret mode) against the chunked XLA form and the token loop."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers.kernels import chunked_recurrence, recurrence_reference, supports
from mixers.ops.recurrence import gated_linear_recurrence

B, T, H, K, V, C = 2, 48, 2, 12, 20, 16
SCALE = 0.4


def _inputs(decay, seed=0, strength=1.0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q, k = (jax.random.normal(x, (B, T, H, K), dtype) for x in ks[:2])
  v = jax.random.normal(ks[2], (B, T, H, V), dtype)
  shape = {"none": None, "scalar": (B, T, H), "channel": (B, T, H, K)}[decay]
  g = None if shape is None else -strength * jax.random.uniform(ks[3], shape)
  s0 = jax.random.normal(ks[4], (B, H, K, V), jnp.float32)
  return q, k, v, g, s0


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-12)


@functools.partial(jax.jit, static_argnames=("fn",))
def _outputs_and_grads(fn, q, k, v, g, s0, do, ds):
  """(o, final state, grads of <o, do> + <state, ds> into q, k, v, g, s0)."""
  (o, s), vjp = jax.vjp(fn, q, k, v, g, s0)
  return o, s, vjp((do, ds))


def _kernel_fn(backend):
  return lambda q, k, v, g, s0: chunked_recurrence(q, k, v, g, scale=SCALE, initial_state=s0,
                                                   chunk_size=C, interpret=True, backend=backend)


def _chunked_fn(q, k, v, g, s0):
  return gated_linear_recurrence(q, k, v, g, scale=SCALE, initial_state=s0, chunk_size=C,
                                 impl="chunked")


def _loop_fn(q, k, v, g, s0):
  return recurrence_reference(q, k, v, g, scale=SCALE, initial_state=s0)


def _cotangents(seed=7):
  ka, kb = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(ka, (B, T, H, V)), jax.random.normal(kb, (B, H, K, V))


def _no_decay(fn):
  return lambda q, k, v, g, s0: fn(q, k, v, None, s0)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("decay", ["none", "scalar", "channel"])
def test_kernel_matches_chunked_form(backend, decay):
  q, k, v, g, s0 = _inputs(decay)
  kernel, chunked = _kernel_fn(backend), _chunked_fn
  if g is None:  # differentiate through the same signature; the dummy decay is unused
    g, kernel, chunked = jnp.zeros((B, T, H)), _no_decay(kernel), _no_decay(chunked)
  ct = _cotangents()
  o, s, grads = _outputs_and_grads(kernel, q, k, v, g, s0, *ct)
  o_ref, s_ref, grads_ref = _outputs_and_grads(chunked, q, k, v, g, s0, *ct)
  assert o.shape == (B, T, H, V) and o.dtype == q.dtype and s.dtype == jnp.float32
  assert _rel_err(o, o_ref) < 1e-5
  assert _rel_err(s, s_ref) < 1e-5
  names = ("dq", "dk", "dv", "dg", "ds0")
  for name, a, b in zip(names, grads, grads_ref):
    if name == "dg" and decay == "none":
      continue
    assert a.shape == b.shape, name
    assert _rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("backend,decay", [("tpu", "channel"), ("gpu", "scalar")])
def test_strong_decay_is_finite_and_exact(backend, decay):
  """log decay down to -20 per step: exponents are masked before exp, nothing overflows."""
  q, k, v, g, s0 = _inputs(decay, seed=1, strength=20.0)
  ct = _cotangents(3)
  o, s, grads = _outputs_and_grads(_kernel_fn(backend), q, k, v, g, s0, *ct)
  with jax.enable_x64(True):
    f64 = lambda x: np.asarray(x, np.float64)
    o_ref, s_ref, grads_ref = _outputs_and_grads(_loop_fn, *map(f64, (q, k, v, g, s0)),
                                                 *map(f64, ct))
  for a, b in zip((o, s) + tuple(grads), (o_ref, s_ref) + tuple(grads_ref)):
    assert np.all(np.isfinite(np.asarray(a)))
    assert _rel_err(a, b) < 1e-5


def test_bfloat16_inputs_accumulate_in_float32():
  q, k, v, g, s0 = _inputs("channel", seed=2, dtype=jnp.bfloat16)
  o, s = jax.jit(_kernel_fn("gpu"))(q, k, v, g, s0)
  o_ref, s_ref = _loop_fn(*(x.astype(jnp.float32) for x in (q, k, v)), g, s0)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  assert _rel_err(o, o_ref) < 2e-2
  assert _rel_err(s, s_ref) < 2e-2


def test_causal():
  """Changing tokens from position 20 on leaves earlier outputs untouched."""
  q, k, v, g, s0 = _inputs("channel", seed=4)
  fn = jax.jit(_kernel_fn("gpu"))
  later = jnp.arange(T)[None, :, None, None] >= 20
  o1, _ = fn(q, k, v, g, s0)
  o2, _ = fn(jnp.where(later, 3.0, q), jnp.where(later, -2.0, k), jnp.where(later, 5.0, v),
             jnp.where(later, -0.5, g), s0)
  np.testing.assert_array_equal(np.asarray(o1[:, :20]), np.asarray(o2[:, :20]))
  assert not np.allclose(np.asarray(o1[:, 20:]), np.asarray(o2[:, 20:]))


def test_bad_shapes_raise():
  q, k, v, g, s0 = _inputs("scalar")
  call = functools.partial(chunked_recurrence, scale=1.0, initial_state=None, interpret=True)
  with pytest.raises(ValueError, match="chunk_size"):
    call(q, k, v, g, chunk_size=32)
  with pytest.raises(ValueError, match="log_decay"):
    call(q, k, v, g[..., :1], chunk_size=16)
  with pytest.raises(ValueError, match="initial_state"):
    chunked_recurrence(q, k, v, g, scale=1.0, initial_state=s0[..., :3], chunk_size=16)
  with pytest.raises(ValueError, match="v must be"):
    call(q, k, v[:, :8], g, chunk_size=16)


def test_supports():
  sds = jax.ShapeDtypeStruct
  q = sds((1, 256, 4, 64), jnp.bfloat16)
  v = sds((1, 256, 4, 128), jnp.bfloat16)
  g = sds((1, 256, 4, 64), jnp.float32)
  assert supports(q, q, v, g, 64, "tpu") and supports(q, q, v, None, 64, "gpu")
  assert not supports(q, q, v, g, 48, "gpu")      # chunk not a power of two
  assert not supports(q, q, v, g, 8, "tpu")       # bf16 needs 16-row tiles
  assert not supports(q, q, v, g, 100, "tpu")     # T not a multiple of the chunk
  assert not supports(q, q, v, g, 64, "cpu")
