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


@pytest.mark.parametrize("tq, tk, hkv, dv", [(13, 13, 4, 8), (5, 13, 2, 8), (13, 13, 4, 6)])
@pytest.mark.parametrize("causal", [False, True])
def test_against_numpy(tq, tk, hkv, dv, causal):
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (2, tq, 4, 8))
  k = jax.random.normal(ks[1], (2, tk, hkv, 8))
  v = jax.random.normal(ks[2], (2, tk, hkv, dv))
  mask = np.ones((1, 1, tq, tk), bool)
  if causal:  # bottom-right aligned: query i sees keys up to i + tk - tq
    mask = np.arange(tk)[None, :] <= np.arange(tq)[:, None] + tk - tq
  assert_close(ops.attention(q, k, v, causal=causal), explicit(q, k, v, mask), 2e-6)


def test_key_padding_mask():
  ks = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(kk, (2, 9, 2, 8)) for kk in ks)
  valid = jnp.arange(9)[None, :] < jnp.array([[9], [5]])
  o = ops.attention(q, k, v, mask=valid)
  o_short = ops.attention(q[1:], k[1:, :5], v[1:, :5])
  assert_close(o[1], o_short[0], 2e-6)


def test_causality():
  ks = jax.random.split(jax.random.key(2), 3)
  q, k, v = (jax.random.normal(kk, (1, 12, 2, 8)) for kk in ks)
  o1 = ops.attention(q, k, v, causal=True)
  o2 = ops.attention(q, k.at[:, 7:].add(3.0), v.at[:, 7:].add(3.0), causal=True)
  np.testing.assert_allclose(o1[:, :7], o2[:, :7], atol=1e-6)


def test_bad_input():
  q = jnp.zeros((2, 5, 4, 8))
  with pytest.raises(ValueError, match="k must have shape"):
    ops.attention(q, jnp.zeros((2, 5, 4, 7)), jnp.zeros((2, 5, 4, 8)))
  with pytest.raises(ValueError, match="must divide"):
    ops.attention(q, jnp.zeros((2, 5, 3, 8)), jnp.zeros((2, 5, 3, 8)))
