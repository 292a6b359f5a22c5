"""Softmax attention against a numpy softmax; cross attention, grouped heads, masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers import ops
from tests.conftest import assert_close


def explicit(q, k, v, mask):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def normal(r, *shape):
  """float32 inputs drawn with numpy (eager jax.random calls compile a program per new shape)."""
  return jnp.asarray(r.randn(*shape), jnp.float32)


@jax.jit
def _both(q, k, v):
  """Non-causal and causal attention, in one program."""
  return ops.attention(q, k, v), ops.attention(q, k, v, causal=True)


@pytest.mark.parametrize("tq, tk, hkv, dv", [(13, 13, 4, 8), (5, 13, 2, 8), (13, 13, 4, 6)])
def test_against_numpy(tq, tk, hkv, dv):
  """Non-causal and causal (bottom-right aligned when tq < tk) against the numpy softmax."""
  r = np.random.RandomState(0)
  q, k, v = normal(r, 2, tq, 4, 8), normal(r, 2, tk, hkv, 8), normal(r, 2, tk, hkv, dv)
  full, causal = _both(q, k, v)
  assert_close(full, explicit(q, k, v, np.ones((1, 1, tq, tk), bool)), 2e-6, "non-causal")
  # bottom-right aligned: query i sees keys up to i + tk - tq
  mask = np.arange(tk)[None, :] <= np.arange(tq)[:, None] + tk - tq
  assert_close(causal, explicit(q, k, v, mask), 2e-6, "causal")


def test_key_padding_mask():
  r = np.random.RandomState(1)
  q, k, v = (normal(r, 2, 9, 2, 8) for _ in range(3))
  valid = np.arange(9)[None, :] < np.array([[9], [5]])
  o, o_short = jax.jit(lambda q, k, v, valid: (ops.attention(q, k, v, mask=valid),
                                               ops.attention(q[1:], k[1:, :5], v[1:, :5])))(q, k, v, valid)
  assert_close(o[1], o_short[0], 2e-6)


def test_causality():
  r = np.random.RandomState(2)
  q, k, v = (normal(r, 1, 12, 2, 8) for _ in range(3))
  o1, o2 = jax.jit(lambda q, k, v: (ops.attention(q, k, v, causal=True),
                                    ops.attention(q, k.at[:, 7:].add(3.0), v.at[:, 7:].add(3.0), causal=True)))(q, k, v)
  np.testing.assert_allclose(o1[:, :7], o2[:, :7], atol=1e-6)


def test_bad_input():
  q = jnp.zeros((2, 5, 4, 8))
  with pytest.raises(ValueError, match="k must have shape"):
    ops.attention(q, jnp.zeros((2, 5, 4, 7)), jnp.zeros((2, 5, 4, 8)))
  with pytest.raises(ValueError, match="must divide"):
    ops.attention(q, jnp.zeros((2, 5, 3, 8)), jnp.zeros((2, 5, 3, 8)))
