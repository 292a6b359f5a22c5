"""Every registered sequence mixer against the layer contract: shapes, jit/grad, causality, decoding, masks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixers
from mixers import registry
from tests.conftest import assert_close, random_variables

B, T, D = 2, 13, 16
SMALL = {
    "attention": dict(num_heads=2),
    "linear_attention": dict(num_heads=2),
    "retention": dict(num_heads=2),
    "gla": dict(num_heads=2, gate_rank=4),
    "mamba2": dict(head_dim=8, state_dim=8, chunk_size=16),
    "hydra": dict(head_dim=8, state_dim=8, chunk_size=16),
    "vssd": dict(head_dim=8, state_dim=8),
    "m2": dict(max_len=32),
    "lightnet": dict(num_heads=2, gate_rank=4),
    "delta_net": dict(num_heads=2, chunk_size=8),
    "gated_delta_net": dict(num_heads=2, chunk_size=8),
    "hyper_attention": dict(num_heads=2, block_size=16, sample_size=4, min_seq_len=4),  # LSH path, exact
}
CAUSAL = [n for n in registry.names("sequence") if registry.is_causal_capable(n)]
NONCAUSAL = registry.names("sequence")


def build(name, causal):
  return mixers.build_mixer(name, causal=causal, **SMALL[name])


def inputs(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, T, D))


@functools.lru_cache(maxsize=None)
def init(name, causal):
  """(layer, random variables of its shapes): the init is not compiled."""
  layer = build(name, causal)
  return layer, random_variables(layer, inputs())


def test_every_registered_mixer_has_a_small_config():
  assert sorted(SMALL) == registry.names("sequence")


@pytest.mark.parametrize("name", NONCAUSAL)
def test_shapes_jit_and_grad(name):
  causal = name in CAUSAL
  layer, variables = init(name, causal)
  x = inputs()

  def loss(v):
    y = layer.apply(v, x)
    return jnp.sum(y ** 2), y

  grads, y = jax.jit(jax.grad(loss, has_aux=True))(variables)
  assert y.shape == x.shape and y.dtype == x.dtype
  leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]  # checked in numpy: no small programs per leaf shape
  assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
  assert any(np.abs(g).max() > 0 for g in leaves)


@pytest.mark.parametrize("name", CAUSAL)
def test_causality(name):
  layer, variables = init(name, True)
  x = inputs()
  t = 6
  changed = x.at[:, t + 1:].set(jax.random.normal(jax.random.key(9), (B, T - t - 1, D)))
  # both inputs in one batch (its rows are independent): one forward to compile
  y1, y2 = np.split(np.asarray(jax.jit(layer.apply)(variables, jnp.concatenate([x, changed]))), 2)
  np.testing.assert_allclose(y1[:, :t + 1], y2[:, :t + 1], atol=1e-6, rtol=1e-6)
  assert not np.allclose(y1[:, t + 1:], y2[:, t + 1:])


@pytest.mark.parametrize("name", CAUSAL)
def test_decode_equals_forward(name):
  """A 5-token prompt, then one token at a time, reproduces the full forward."""
  layer, variables = init(name, True)
  x = inputs()
  y, cache = jax.jit(lambda v: (layer.apply(v, x), layer.init(jax.random.key(1), x, decode=True)["cache"]))(variables)
  step = jax.jit(lambda c, xt: layer.apply({**variables, "cache": c}, xt, decode=True, mutable=["cache"]))
  x = np.asarray(x)  # numpy slices: no small slicing programs per position
  out, state = step(cache, x[:, :5])
  outs = [out]
  cache = state["cache"]
  for t in range(5, T):
    out, state = step(cache, x[:, t:t + 1])
    outs.append(out)
    cache = state["cache"]
  assert_close(np.concatenate(outs, axis=1), y, 1e-5, f"{name} decode vs forward")


@pytest.mark.parametrize("name", [n for n in NONCAUSAL if not SMALL[n].get("causal_only")])
def test_noncausal_every_output_depends_on_every_input(name):
  """Moving input token s along a random direction moves every output token t (forward-mode, one tangent per s)."""
  layer, variables = init(name, False)
  x = inputs()[:1]
  direction = jax.random.normal(jax.random.key(5), x.shape)
  moved = lambda e: layer.apply(variables, x + e[None, :, None] * direction)[0]  # e [T]: one scale per token
  jac = np.asarray(jax.jit(jax.jacfwd(moved))(jnp.zeros(T)))  # [T,D,T]
  influence = np.sqrt(np.sum(jac ** 2, axis=1))  # [T,T]
  assert float(influence.min()) > 0, f"{name}: some output ignores some input"


@pytest.mark.parametrize("name", NONCAUSAL)
def test_padding_does_not_leak(name):
  """Right-padded sequences give, on their real tokens, what the unpadded sequences give alone."""
  causal = name in CAUSAL
  layer, variables = init(name, causal)
  x = inputs(3)
  length = 8
  mask = jnp.arange(T)[None, :] < jnp.array([[T], [length]])
  x_padded = x.at[1, length:].set(100.0)  # garbage in the pads
  y, y_alone = jax.jit(lambda v: (layer.apply(v, x_padded, mask=mask), layer.apply(v, x[1:, :length])))(variables)
  assert_close(y[1, :length], y_alone[0], 1e-5, f"{name} padded vs alone")


def test_unknown_names_and_arguments():
  with pytest.raises(ValueError, match="valid names: .*attention.*gla.*hydra"):
    mixers.build_mixer("transformer")
  with pytest.raises(ValueError, match="valid arguments: .*num_heads"):
    mixers.build_mixer("gla", heads=3)
  with pytest.raises(ValueError, match="num_heads=3 must divide the key width 8"):
    mixers.build_mixer("gla", num_heads=3).init(jax.random.key(0), inputs())
  with pytest.raises(ValueError, match="decode=True needs causal=True"):
    mixers.build_mixer("linear_attention", causal=False).init(jax.random.key(0), inputs(), decode=True)
