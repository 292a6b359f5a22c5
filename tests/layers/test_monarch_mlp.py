"""Monarch MLP against a dense GLU with the same (Monarch-representable) matrices."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers import registry
from mixers.layers.monarch_mlp import MonarchLinear, MonarchMLP, dense_weights


def dense_glu(x, gate, up, down):
  """The reference, in numpy (no op-by-op compiles)."""
  x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
  g = x @ gate.T
  return (g / (1 + np.exp(-g)) * (x @ up.T)) @ down.T


def _init(module, x):
  return nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), x))


def test_registry_builds_monarch_mlp():
  assert isinstance(registry.build_mixer("monarch_mlp", nblocks=2), MonarchMLP)
  assert "monarch_mlp" in registry.names("channel")


def test_one_block_monarch_is_any_dense_matrix():
  """nblocks=1: M = L R, so (R, L) = (W, I) or (I, W) gives any given dense W."""
  rng = np.random.default_rng(0)
  d, h = 6, 10
  x = jnp.asarray(rng.standard_normal((3, 4, d)), jnp.float32)
  W = {n: jnp.asarray(rng.standard_normal(s), jnp.float32) for n, s in
       (("gate", (h, d)), ("up", (h, d)), ("down", (d, h)))}
  mlp = MonarchMLP(hidden=h, nblocks=1)
  params = {"gate": {"R": W["gate"][None], "L": jnp.eye(h)[None]},
            "up": {"R": W["up"][None], "L": jnp.eye(h)[None]},
            "down": {"R": jnp.eye(h)[None], "L": W["down"][None]}}
  shapes = nn.unbox(jax.eval_shape(mlp.init, jax.random.PRNGKey(0), x))["params"]  # the init's shapes, not compiled
  assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(lambda a: a.shape, shapes)
  np.testing.assert_allclose(jax.jit(mlp.apply)({"params": params}, x), dense_glu(x, W["gate"], W["up"], W["down"]),
                             rtol=1e-5, atol=1e-5)


def test_constant_blocks_give_a_kronecker_glu():
  """d = hidden = nblocks^2: constant blocks A (of L) and B (of R) make the dense map kron(A, B)."""
  rng = np.random.default_rng(1)
  nb = 4
  d = nb * nb
  x = jnp.asarray(rng.standard_normal((5, d)), jnp.float32)
  params, dense = {}, {}
  for name in ("gate", "up", "down"):
    A, Bm = rng.standard_normal((nb, nb)), rng.standard_normal((nb, nb))
    params[name] = {"L": jnp.asarray(np.broadcast_to(A, (nb, nb, nb)), jnp.float32),
                    "R": jnp.asarray(np.broadcast_to(Bm, (nb, nb, nb)), jnp.float32)}
    dense[name] = jnp.asarray(np.kron(A, Bm), jnp.float32)
  y = jax.jit(MonarchMLP(hidden=d, nblocks=nb).apply)({"params": params}, x)
  np.testing.assert_allclose(y, dense_glu(x, dense["gate"], dense["up"], dense["down"]), rtol=1e-4, atol=1e-4)


def test_random_monarch_mlp_matches_its_dense_matrices():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 3, 12)), jnp.float32)
  mlp = MonarchMLP(expansion=2, nblocks=3)
  variables = _init(mlp, x)
  W = jax.jit(dense_weights)(variables["params"])
  assert W["up"].shape == (24, 12) and W["down"].shape == (12, 24)
  assert np.linalg.matrix_rank(np.asarray(W["up"])) == 12
  np.testing.assert_allclose(jax.jit(mlp.apply)(variables, x), dense_glu(x, W["gate"], W["up"], W["down"]),
                             rtol=1e-4, atol=1e-5)


def test_bad_nblocks_raise():
  with pytest.raises(ValueError, match="nblocks=5 must divide"):
    MonarchLinear(10, nblocks=5).init(jax.random.PRNGKey(0), jnp.ones((2, 12)))
