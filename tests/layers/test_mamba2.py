"""Mamba2 layer: shapes, initialisation, causality, decode == forward, padding, matrix view, errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from mixers.layers.mamba2 import Mamba2
from mixers.ops.ssd import ssd
from mixers.registry import build_mixer

B, T, D = 2, 13, 8
LAYER = Mamba2(head_dim=4, state_dim=6, num_groups=2, chunk_size=4)  # H = 4 heads, G = 2
X = jax.random.normal(jax.random.key(0), (B, T, D))
VARS = jax.jit(LAYER.init)(jax.random.key(1), X)
PARAMS = {"params": VARS["params"]}
_apply = jax.jit(lambda p, x: LAYER.apply(p, x))


def random_variables(module, x, seed=0):
  """N(0, 0.3^2) values (numpy: no compile) in the shapes of the variables `module.init` would make."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
  return jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype), shapes)


def test_shapes_registry_and_initialisation():
  assert isinstance(build_mixer("mamba2", head_dim=4), Mamba2)
  assert _apply(PARAMS, X).shape == (B, T, D)
  ssm = meta.unbox(VARS["params"]["ssm"])
  dt = jax.nn.softplus(ssm["dt_bias"])
  assert np.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5)))
  assert np.all((ssm["A_log"] >= 0) & (ssm["A_log"] <= math.log(16) + 1e-6))
  np.testing.assert_array_equal(ssm["D"], 1.0)


def test_causal_and_differentiable():
  jac = jax.jit(jax.jacfwd(lambda x: LAYER.apply(PARAMS, x)))(X[:1])
  per_pos = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 5))  # [t, s]
  assert np.all(np.triu(per_pos, 1) == 0)
  assert np.all(per_pos[np.tril_indices(T)] > 0)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(LAYER.apply(p, X) ** 2)))(PARAMS)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)


_step = jax.jit(lambda p, cache, x: LAYER.apply({**p, "cache": cache}, x, decode=True, mutable=["cache"]))


def test_decode_token_by_token_and_by_chunks_reproduces_forward():
  full = _apply(PARAMS, X)
  # a fresh cache is all zeros (no init to compile): the state, the short convolution's history, the position
  cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                       jax.eval_shape(lambda: LAYER.init(jax.random.key(1), X, decode=True))["cache"])
  outs = []
  for t0, t1 in [(0, 5)] + [(t, t + 1) for t in range(5, T)]:  # a 5-token prompt, then one token at a time
    y, upd = _step(PARAMS, cache, X[:, t0:t1])
    cache = upd["cache"]
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)
  assert cache["state"].shape == (B, 4, 4, 6)


def test_left_padding_does_not_leak():
  pad = 4
  junk = 100.0 * jax.random.normal(jax.random.key(2), (B, pad, D))
  mask = jnp.concatenate([jnp.zeros((B, pad), bool), jnp.ones((B, T), bool)], axis=1)
  y = jax.jit(lambda p, x, m: LAYER.apply(p, x, mask=m))(PARAMS, jnp.concatenate([junk, X], 1), mask)
  np.testing.assert_allclose(y[:, pad:], _apply(PARAMS, X), rtol=1e-4, atol=1e-5)


def test_mixing_matrix_is_what_the_ssm_applies():
  @jax.jit
  def matrix_product_and_ssd(params, x):  # one program: the matrix applied to x, and the SSD on the same operands
    m = LAYER.apply(params, x, method="mixing_matrix")
    operands, _ = LAYER.apply(params, x, method="operands")
    return m, jnp.einsum("bhts,bshp->bthp", m, operands["x"]), ssd(**operands, impl="recurrent")

  m, my, y = matrix_product_and_ssd(PARAMS, X)
  assert m.shape == (B, 4, T, T)
  np.testing.assert_allclose(np.triu(m, 1), 0.0)
  np.testing.assert_allclose(my, y, rtol=1e-4, atol=1e-5)


def test_bad_shapes_raise_clear_errors():
  with pytest.raises(ValueError, match="head_dim=3 must divide"):
    Mamba2(head_dim=3).init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="num_heads=3 must divide"):
    Mamba2(num_heads=3).init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="num_groups=3 must divide the head count 4"):
    Mamba2(head_dim=4, num_groups=3).init(jax.random.key(0), X)
  with pytest.raises(ValueError, match=r"x must have shape \[B,T,d_model\]"):
    LAYER.apply(PARAMS, X[0])
  with pytest.raises(ValueError, match="mask must have shape"):
    LAYER.apply(PARAMS, X, mask=jnp.ones((B, T + 1), bool))
  with pytest.raises(ValueError, match="decode=True needs causal=True"):
    Mamba2(head_dim=4, causal=False).init(jax.random.key(0), X, decode=True)


def test_noncausal_variant_mixes_both_ways():
  layer = Mamba2(head_dim=4, state_dim=6, causal=False)
  params = random_variables(layer, X)
  jac = jax.jit(jax.jacfwd(lambda x: layer.apply(params, x)))(X[:1])
  assert np.all(np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 5)) > 0)
