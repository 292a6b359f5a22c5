"""The HyperAttention layer against the softmax Attention layer at the same parameters (exact regime), self and
cross attention, and its approximate regime's causality."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixers
from tests.conftest import assert_close

B, T, TK, D = 2, 11, 7, 16
EXACT = dict(num_heads=2, block_size=16, sample_size=4, min_seq_len=4)  # one block covers every part's keys


@pytest.mark.parametrize("causal", [False, True])
def test_exact_regime_equals_attention_at_the_same_parameters(causal):
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  context = jax.random.normal(jax.random.key(1), (B, T if causal else TK, D))
  context_mask = jnp.ones(context.shape[:2], bool).at[1, -2:].set(False)
  hyper = mixers.build_mixer("hyper_attention", causal=causal, **EXACT)
  attention = mixers.build_mixer("attention", causal=causal, num_heads=2)
  variables = jax.jit(hyper.init)(jax.random.key(2), x)
  assert jax.tree.structure(variables) == jax.tree.structure(jax.eval_shape(attention.init, jax.random.key(2), x))
  apply = jax.jit(lambda layer, *a: layer.apply(variables, a[0], context=a[1], context_mask=a[2]), static_argnums=0)
  assert_close(apply(hyper, x, None, None), apply(attention, x, None, None), 1e-5, "self attention")
  assert_close(apply(hyper, x, context, context_mask), apply(attention, x, context, context_mask), 1e-5, "cross")


def test_approximate_regime_is_causal_and_takes_an_rng_stream():
  t = 40
  layer = mixers.build_mixer("hyper_attention", num_heads=2, block_size=4, sample_size=4, min_seq_len=5)
  x = jax.random.normal(jax.random.key(0), (B, t, D))
  variables = jax.jit(layer.init)(jax.random.key(1), x)
  apply = jax.jit(lambda x, key: layer.apply(variables, x, rngs={"hyper_attention": key}))
  y1 = apply(x, jax.random.key(3))
  y2 = apply(x.at[:, 20:].set(0.0), jax.random.key(3))
  np.testing.assert_allclose(y1[:, :20], y2[:, :20], atol=1e-6, rtol=1e-6)
  assert not np.allclose(apply(x, jax.random.key(4)), y1), "another key should draw other hashes and samples"
  exact = jax.jit(mixers.build_mixer("attention", num_heads=2).apply)(variables, x)
  assert 1e-3 < float(jnp.linalg.norm(y1 - exact) / jnp.linalg.norm(exact)) < 1
