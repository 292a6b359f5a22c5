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


def test_grid_and_flat_inputs_agree_and_differentiate():
  assert isinstance(build_mixer("vssd", head_dim=4), VSSD)
  y = _apply(PARAMS, X)
  assert y.shape == X.shape
  flat = VSSD(head_dim=4, state_dim=6, num_groups=2, grid_shape=(H, W))
  np.testing.assert_allclose(flat.apply(PARAMS, X.reshape(B, H * W, D)), y.reshape(B, H * W, D), rtol=1e-5,
                             atol=1e-6)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(LAYER.apply(p, X) ** 2)))(PARAMS)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)


def test_every_output_depends_on_every_input():
  jac = jax.jit(jax.jacobian(lambda x: LAYER.apply(PARAMS, x)))(X[:1])
  per_pos = np.abs(np.asarray(jac)).sum(axis=(0, 3, 4, 7))  # [h, w, h', w']
  assert np.all(per_pos > 0)


def test_masked_tokens_do_not_leak():
  """A 1-D VSSD: padded tokens (junk values) change nothing on the real tokens."""
  layer = VSSD(head_dim=4, state_dim=6)
  x = X.reshape(B, H * W, D)
  params = jax.jit(layer.init)(jax.random.key(3), x)
  pad = 3
  xp = jnp.concatenate([x, 100.0 * jax.random.normal(jax.random.key(4), (B, pad, D))], 1)
  mask = jnp.arange(H * W + pad)[None, :] < H * W
  y = jax.jit(lambda p, x, m: layer.apply(p, x, mask=m))(params, xp, jnp.broadcast_to(mask, (B, H * W + pad)))
  np.testing.assert_allclose(y[:, :H * W], jax.jit(layer.apply)(params, x), rtol=1e-4, atol=1e-5)


def test_mixing_matrix_is_what_the_ssm_applies():
  m = LAYER.apply(PARAMS, X, method="mixing_matrix")
  operands, _ = LAYER.apply(PARAMS, X, method="operands")
  assert m.shape == (B, 4, H * W, H * W)
  y = ssd(**operands, causal=False)
  np.testing.assert_allclose(jnp.einsum("bhts,bshp->bthp", m, operands["x"]), y, rtol=1e-4, atol=1e-5)


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
