"""The HyperAttention layer against the softmax Attention layer at the same parameters (exact regime), self and
cross attention, and its approximate regime's causality."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixers
from tests.conftest import assert_close, random_variables

B, T, TK, D = 2, 11, 7, 16
EXACT = dict(num_heads=2, block_size=16, sample_size=4, min_seq_len=4)  # one block covers every part's keys


@pytest.mark.parametrize("causal", [False, True])
def test_exact_regime_equals_attention_at_the_same_parameters(causal):
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  context = jax.random.normal(jax.random.key(1), (B, T if causal else TK, D))
  context_mask = jnp.ones(context.shape[:2], bool).at[1, -2:].set(False)
  hyper = mixers.build_mixer("hyper_attention", causal=causal, **EXACT)
  attention = mixers.build_mixer("attention", causal=causal, num_heads=2)
  variables = random_variables(hyper, x)  # any parameters: both layers read the same ones
  assert jax.tree.structure(variables) == jax.tree.structure(jax.eval_shape(attention.init, jax.random.key(2), x))

  @jax.jit
  def both(x, context, context_mask):  # self and cross attention through both layers, one program
    apply = lambda layer, *a: layer.apply(variables, x, context=a[0], context_mask=a[1])
    return [(apply(hyper, *a), apply(attention, *a)) for a in ((None, None), (context, context_mask))]

  (self_hyper, self_attention), (cross_hyper, cross_attention) = both(x, context, context_mask)
  assert_close(self_hyper, self_attention, 1e-5, "self attention")
  assert_close(cross_hyper, cross_attention, 1e-5, "cross")


def test_approximate_regime_is_causal_and_takes_an_rng_stream():
  t = 40
  layer = mixers.build_mixer("hyper_attention", num_heads=2, block_size=4, sample_size=4, min_seq_len=10)
  x = jax.random.normal(jax.random.key(0), (B, t, D))
  variables = random_variables(layer, x)  # any parameters: the error against softmax attention is 0.46

  @jax.jit
  def outputs(x, keys):  # three (input, key) pairs through one vmapped layer, and softmax attention
    apply = lambda x, key: layer.apply(variables, x, rngs={"hyper_attention": key})
    ys = jax.vmap(apply)(jnp.stack([x, x.at[:, 20:].set(0.0), x]), keys)
    return ys, mixers.build_mixer("attention", num_heads=2).apply(variables, x)

  (y1, y2, y3), exact = outputs(x, jnp.stack([jax.random.key(3), jax.random.key(3), jax.random.key(4)]))
  np.testing.assert_allclose(y1[:, :20], y2[:, :20], atol=1e-6, rtol=1e-6)
  assert not np.allclose(y3, y1), "another key should draw other hashes and samples"
  assert 1e-3 < float(jnp.linalg.norm(y1 - exact) / jnp.linalg.norm(exact)) < 1
