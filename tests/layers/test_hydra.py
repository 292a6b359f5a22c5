"""Hydra layer: shapes, bidirectional mixing, padding, matrix view, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from mixers.layers.hydra import Hydra
from mixers.ops.quasiseparable import quasiseparable
from mixers.registry import build_mixer

B, T, D = 2, 11, 8
LAYER = Hydra(head_dim=4, state_dim=6, num_groups=2, chunk_size=4)
X = jax.random.normal(jax.random.key(0), (B, T, D))
PARAMS = {"params": jax.jit(LAYER.init)(jax.random.key(1), X)["params"]}
_apply = jax.jit(lambda p, x, mask=None: LAYER.apply(p, x, mask=mask))


def test_shapes_registry_init_and_gradients():
  assert isinstance(build_mixer("hydra", head_dim=4), Hydra)
  assert _apply(PARAMS, X).shape == (B, T, D)
  ssm = meta.unbox(PARAMS["params"]["ssm"])
  np.testing.assert_allclose(ssm["A_log"], 0.0)  # A = -1 at init
  assert meta.unbox(PARAMS["params"]["fc_D"]["kernel"]).shape == (2 * D, 4)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(LAYER.apply(p, X) ** 2)))(PARAMS)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)


def test_every_output_depends_on_every_input():
  jac = jax.jit(jax.jacfwd(lambda x: LAYER.apply(PARAMS, x)))(X[:1])
  assert np.all(np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 5)) > 0)


def test_padded_batch_equals_sequences_one_by_one():
  pad = 5
  junk = 100.0 * jax.random.normal(jax.random.key(2), (B, pad, D))
  xp = jnp.concatenate([X, junk], 1)
  lengths = np.array([T, T - 3])
  mask = jnp.arange(T + pad)[None, :] < lengths[:, None]
  y = _apply(PARAMS, xp, mask)
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(y[i, :n], _apply(PARAMS, X[i:i + 1, :n])[0], rtol=1e-4, atol=1e-5)


def test_mixing_matrix_is_what_the_ssm_applies():
  @jax.jit
  def matrix_product_and_recurrence(params, x):  # one program: the matrix applied to x, the recurrence on the same
    m = LAYER.apply(params, x, method="mixing_matrix")
    operands, _ = LAYER.apply(params, x, method="operands")
    return m, jnp.einsum("bhts,bshp->bthp", m, operands["x"]), quasiseparable(**operands, impl="recurrent")

  m, my, y = matrix_product_and_recurrence(PARAMS, X)
  assert m.shape == (B, 4, T, T)
  assert np.all(np.abs(np.asarray(m)) > 0)  # dense: lower, upper and diagonal all populated
  np.testing.assert_allclose(my, y, rtol=1e-4, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match="causal must be False"):
    Hydra(head_dim=4, causal=True).init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="cannot decode"):
    LAYER.apply(PARAMS, X, decode=True)
  with pytest.raises(ValueError, match="head_dim=5 must divide"):
    Hydra(head_dim=5).init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="num_groups=3 must divide"):
    Hydra(head_dim=4, num_groups=3).init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="mask must have shape"):
    LAYER.apply(PARAMS, X, mask=jnp.ones((B, T - 1), bool))
