"""VSSD layer: token grids, global mixing, order independence of the SSD, padding, matrix view, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers.layers.vssd import VSSD
from mixers.ops.ssd import ssd
from mixers.registry import build_mixer

B, H, W, D = 2, 3, 4, 8
LAYER = VSSD(head_dim=4, state_dim=6, num_groups=2)
X = jax.random.normal(jax.random.key(0), (B, H, W, D))
PARAMS = {"params": jax.jit(LAYER.init)(jax.random.key(1), X)["params"]}
_apply = jax.jit(lambda p, x: LAYER.apply(p, x))


def random_variables(module, x, seed=0):
  """N(0, 0.3^2) values (numpy: no compile) in the shapes of the variables `module.init` would make."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
  return jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype), shapes)


def test_grid_and_flat_inputs_agree_and_differentiate():
  assert isinstance(build_mixer("vssd", head_dim=4), VSSD)
  y = _apply(PARAMS, X)
  assert y.shape == X.shape
  flat = VSSD(head_dim=4, state_dim=6, num_groups=2, grid_shape=(H, W))
  np.testing.assert_allclose(jax.jit(flat.apply)(PARAMS, X.reshape(B, H * W, D)), y.reshape(B, H * W, D), rtol=1e-5,
                             atol=1e-6)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(LAYER.apply(p, X) ** 2)))(PARAMS)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)


def test_every_output_depends_on_every_input():
  jac = jax.jit(jax.jacfwd(lambda x: LAYER.apply(PARAMS, x)))(X[:1])
  per_pos = np.abs(np.asarray(jac)).sum(axis=(0, 3, 4, 7))  # [h, w, h', w']
  assert np.all(per_pos > 0)


def test_masked_tokens_do_not_leak():
  """A 1-D VSSD: padded tokens (junk values) change nothing on the real tokens."""
  layer = VSSD(head_dim=4, state_dim=6)
  x = X.reshape(B, H * W, D)
  params = random_variables(layer, x)
  pad = 3
  xp = jnp.concatenate([x, 100.0 * jax.random.normal(jax.random.key(4), (B, pad, D))], 1)
  mask = jnp.arange(H * W + pad)[None, :] < H * W
  y = jax.jit(lambda p, x, m: layer.apply(p, x, mask=m))(params, xp, jnp.broadcast_to(mask, (B, H * W + pad)))
  np.testing.assert_allclose(y[:, :H * W], jax.jit(layer.apply)(params, x), rtol=1e-4, atol=1e-5)


def test_mixing_matrix_is_what_the_ssm_applies():
  @jax.jit
  def matrix_product_and_ssd(params, x):  # one program: the matrix applied to x, and the SSD on the same operands
    m = LAYER.apply(params, x, method="mixing_matrix")
    operands, _ = LAYER.apply(params, x, method="operands")
    return m, jnp.einsum("bhts,bshp->bthp", m, operands["x"]), ssd(**operands, causal=False)

  m, my, y = matrix_product_and_ssd(PARAMS, X)
  assert m.shape == (B, 4, H * W, H * W)
  np.testing.assert_allclose(my, y, rtol=1e-4, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match="causal must be False"):
    VSSD(head_dim=4, causal=True).init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="cannot decode"):
    LAYER.apply(PARAMS, X, decode=True)
  with pytest.raises(ValueError, match="grid_shape"):
    VSSD(head_dim=4, grid_shape=(5, 5)).init(jax.random.key(0), X.reshape(B, H * W, D))
  with pytest.raises(ValueError, match="num_heads=5 must divide"):
    VSSD(num_heads=5).init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="mask must have shape"):
    LAYER.apply(PARAMS, X, mask=jnp.ones((B, H), bool))
