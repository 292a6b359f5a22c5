"""Inputs the ops refuse or handle without computing garbage: integer arrays, empty batches and sequences,
invalid decays and rates under jit (NaN outputs), bad static arguments."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers import ops

H, G, K, V, N, P = 2, 2, 4, 3, 5, 3


def _calls(b, t, dtype=jnp.float32):
  """name -> (zero-argument call, expected output shapes) for every sequence op at batch b and length t."""
  f = lambda *shape: jnp.ones(shape, dtype)
  q, v, x, dt, bc = f(b, t, H, K), f(b, t, H, V), f(b, t, 4, P), f(b, t, 4), f(b, t, G, N)
  a = -jnp.ones(4)
  s0 = jnp.full((b, H, K, V), 0.5)
  return {
      "attention": (lambda: ops.attention(q, q, v), (b, t, H, V)),
      "linear_attention": (lambda: ops.linear_attention(q, q, v, log_decay=-jnp.ones(H), initial_state=s0,
                                                        return_state=True), (b, t, H, V)),
      "linear_attention_noncausal": (lambda: ops.linear_attention(q, q, v, causal=False, log_decay=-jnp.ones(H)),
                                     (b, t, H, V)),
      "ssd": (lambda: ops.ssd(x, dt, a, bc, bc, return_state=True), (b, t, 4, P)),
      "ssd_noncausal": (lambda: ops.ssd(x, dt, a, bc, bc, causal=False), (b, t, 4, P)),
      "quasiseparable": (lambda: ops.quasiseparable(x, (dt, dt), a, (bc, bc), (bc, bc)), (b, t, 4, P)),
      "lightnet": (lambda: ops.lightnet(q, q, v, return_state=True), (b, t, H, V)),
      "lightnet_noncausal": (lambda: ops.lightnet(q, q, v, causal=False), (b, t, H, V)),
      "long_conv": (lambda: ops.long_conv(f(b, t, 3), f(t, 3)), (b, t, 3)),
      "long_conv_monarch": (lambda: ops.long_conv(f(b, t, 3), f(t, 3), impl="monarch"), (b, t, 3)),
  }


@pytest.mark.parametrize("b,t", [(0, 8), (2, 0)])
def test_empty_batch_and_empty_sequence_give_empty_outputs(b, t):
  calls = _calls(b, t)
  outs = jax.jit(lambda: {name: call() for name, (call, _) in calls.items()})()  # every op in one program
  for name, (_, shape) in calls.items():
    out = outs[name]
    o = out[0] if isinstance(out, tuple) else out
    assert o.shape == shape and o.dtype == jnp.float32, name
  if t == 0:  # nothing read: the state is the initial one
    _, state = outs["linear_attention"]
    np.testing.assert_array_equal(state, jnp.full((b, H, K, V), 0.5))
    _, (s, z) = outs["lightnet"]
    assert float(jnp.abs(s).max()) == 0.0 and bool(jnp.all(jnp.isneginf(z)))


def test_integer_inputs_are_refused_by_name():
  x = jnp.ones((2, 8, H, K), jnp.int32)
  with pytest.raises(ValueError, match="q must be a floating-point array"):
    ops.attention(x, x, x)
  with pytest.raises(ValueError, match="q must be a floating-point array"):
    ops.linear_attention(x, x, x)
  with pytest.raises(ValueError, match="q must be a floating-point array"):
    ops.lightnet(x, x, x)
  with pytest.raises(ValueError, match="u must be a floating-point array"):
    ops.long_conv(jnp.ones((2, 8, 3), jnp.int32), jnp.ones((8, 3)))
  with pytest.raises(ValueError, match="x must be a floating-point array"):
    ops.ssd(jnp.ones((2, 8, 4, P), jnp.int32), jnp.ones((2, 8, 4)), -jnp.ones(4), jnp.ones((2, 8, G, N)),
            jnp.ones((2, 8, G, N)))


def test_invalid_decays_and_rates_raise_eagerly_and_give_nan_under_jit():
  q = jnp.ones((1, 8, H, K))
  x, dt, bc = jnp.ones((1, 8, 4, P)), jnp.ones((1, 8, 4)), jnp.ones((1, 8, G, N))
  with pytest.raises(ValueError, match="log_decay must be <= 0"):
    ops.linear_attention(q, q, q, log_decay=jnp.ones(H))
  with pytest.raises(ValueError, match="A must be <= 0"):
    ops.ssd(x, dt, jnp.ones(4), bc, bc)
  with pytest.raises(ValueError, match="dt must be >= 0"):
    ops.ssd(x, -dt, -jnp.ones(4), bc, bc)

  @jax.jit
  def under_jit(g_ok, g_bad, a_ok, a_bad, d_ok, d_bad):  # every case in one program, values traced
    la = lambda g: ops.linear_attention(q, q, q, log_decay=g)
    ssd = lambda a, d: ops.ssd(x, d, a, bc, bc)
    return (la(g_ok), la(g_bad), ssd(a_ok, d_ok), ssd(a_bad, d_ok), ssd(a_ok, d_bad),
            ops.quasiseparable(x, (d_ok, d_ok), a_bad, (bc, bc), (bc, bc)))

  la_ok, la_bad, ssd_ok, ssd_bad_a, ssd_bad_dt, qs_bad = under_jit(-jnp.ones(H), jnp.asarray([0.5, -1.0]),
                                                                   -jnp.ones(4), jnp.ones(4), dt, -dt)
  assert bool(jnp.all(jnp.isfinite(la_ok)))
  assert bool(jnp.all(jnp.isnan(la_bad[:, :, 0])))
  assert bool(jnp.all(jnp.isfinite(ssd_ok)))
  assert bool(jnp.all(jnp.isnan(ssd_bad_a)))
  assert bool(jnp.all(jnp.isnan(ssd_bad_dt)))
  assert bool(jnp.isnan(qs_bad).any())


def test_bad_static_arguments_name_themselves():
  with pytest.raises(ValueError, match="max_block must be a positive integer"):
    ops.long_conv(jnp.ones((1, 8, 3)), jnp.ones((8, 3)), impl="monarch", max_block=0)
  with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
    ops.linear_attention(*(jnp.ones((1, 8, H, K)),) * 3, chunk_size=0)
