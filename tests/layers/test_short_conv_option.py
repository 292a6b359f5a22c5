"""The short-convolution option of retention and LightNet: causal, decodes as the forward, packed segments equal the
segments alone (masked tokens included), and the convs are really applied."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixers
from tests.conftest import assert_close, random_variables

D, T = 16, 13  # chunk_size 4 does not divide T
CONFIGS = {
    "retention": dict(num_heads=2, chunk_size=4, short_conv=True, conv_width=3),
    "lightnet": dict(num_heads=2, gate_rank=4, chunk_size=4, short_conv=True, conv_width=3),
}
LENGTHS = ((5, 1, 7), (3, 10))  # one-token segment, and segments shorter than and beside the conv window
IDS = np.stack([np.repeat([0, 1, 2], LENGTHS[0]), np.repeat([4, 4 + 3], LENGTHS[1])]).astype(np.int32)
MASK = np.ones(IDS.shape, bool)
MASK[1, 1:3] = False  # the first segment of row 1 ends in padded tokens
CUT = 8  # causality: the tokens from CUT on change


def build(name, causal=True, **kw):
  layer = mixers.build_mixer(name, causal=causal, **{**CONFIGS[name], **kw})
  return layer, random_variables(layer, jnp.zeros((2, T, D)))


def places():
  """(row, start, end) of every segment of IDS."""
  return [(b, s, e) for b, lengths in enumerate(LENGTHS)
          for s, e in zip(np.cumsum((0,) + lengths)[:-1], np.cumsum((0,) + lengths)[1:])]


def unpacked(layer, variables, x, changed, mask):
  """One program, no segment_ids: (the layer on x, on changed, and each segment of IDS on its own, right-padded with
  masked tokens and put back in place), each `[B,T,D]`."""
  cut = lambda a: jnp.stack([jnp.pad(a[b, s:e], [(0, T - (e - s))] + [(0, 0)] * (a.ndim - 2)) for b, s, e in places()])
  ones = jnp.ones(x.shape[:2], bool)
  y = layer.apply(variables, jnp.concatenate([x, changed, cut(x)]), mask=jnp.concatenate([ones, ones, cut(mask)]))
  segs = y[2 * len(x):]
  alone = jnp.stack([jnp.concatenate([segs[i, :e - s] for i, (b, s, e) in enumerate(places()) if b == row])
                     for row in range(len(x))])
  return y[:len(x)], y[len(x):2 * len(x)], alone


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_causal_short_conv(name, x64):
  """Future tokens change no past output; token-by-token decode from the empty cache equals the forward; packed rows
  equal their segments alone, whatever the padded tokens hold; the output differs from the same parameters without
  the convs."""
  layer, variables = build(name)
  plain = mixers.build_mixer(name, **{**CONFIGS[name], "short_conv": False})
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, T, D)))
  changed = x.at[:, CUT:].set(-x[:, CUT:] + 1.0)

  @jax.jit
  def forms(variables, x, changed, ids, mask):
    y, y_changed, alone = unpacked(layer, variables, x, changed, mask)
    cache = layer.apply(variables, x[:, :1], decode=True, mutable=["cache"])[1]["cache"]  # the empty cache

    def step(cache, xt):
      y, state = layer.apply({**variables, "cache": cache}, xt[:, None], decode=True, mutable=["cache"])
      return state["cache"], y[:, 0]

    kept = jax.eval_shape(step, cache, x[:, 0])[0]  # the empty state's dtypes as a step keeps them
    cache = jax.tree.map(lambda a, k: a.astype(k.dtype), cache, kept)
    decoded = jnp.swapaxes(jax.lax.scan(step, cache, jnp.swapaxes(x, 0, 1))[1], 0, 1)
    twice = lambda a: jnp.concatenate([a, a])
    packed, padded_changed = jnp.split(layer.apply(variables, jnp.concatenate([x, jnp.where(mask[..., None], x, 3.0)]),
                                                   segment_ids=twice(ids), mask=twice(mask)), 2)
    return y, y_changed, decoded, packed, padded_changed, alone, plain.apply(variables, x)

  y, y_changed, decoded, packed, padded_changed, alone, without = forms(variables, x, changed, IDS, MASK)
  assert_close(y_changed[:, :CUT], y[:, :CUT], 1e-12, f"{name}: outputs before the changed tokens")
  assert not np.allclose(y_changed[:, CUT:], y[:, CUT:], atol=1e-3)
  assert_close(decoded, y, 1e-6, f"{name}: decoded vs forward")
  real = MASK[..., None]
  assert_close(packed * real, alone * real, 1e-6, f"{name}: packed vs segments alone")
  assert_close(padded_changed * real, packed * real, 1e-12, f"{name}: padded tokens changed")
  params = variables["params"]
  widths = {n: jax.tree.leaves(params[n]["kernel"])[0].shape for n in ("conv_q", "conv_k", "conv_v")}
  assert all(w[0] == 3 for w in widths.values()), widths
  assert not np.allclose(without, y, atol=1e-3), f"{name}: short_conv=True changes nothing"


def test_non_causal_lightnet_packed_equals_alone(x64):
  """Centred convs: a packed row's segments equal the segments alone; they read neighbours on both sides."""
  name = "lightnet"
  layer, variables = build(name, causal=False)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, T, D)))
  changed = x.at[:, CUT:].set(-x[:, CUT:] + 1.0)

  @jax.jit
  def forms(variables, x, changed, ids, mask):
    return layer.apply(variables, x, segment_ids=ids, mask=mask), *unpacked(layer, variables, x, changed, mask)

  packed, y, y_changed, alone = forms(variables, x, changed, IDS, MASK)
  real = MASK[..., None]
  assert_close(packed * real, alone * real, 1e-6, f"non-causal {name}: packed vs segments alone")
  assert not np.allclose(y_changed[:, :CUT], y[:, :CUT], atol=1e-3)


def test_fla_names_and_grid_refusal():
  for name in CONFIGS:
    layer = mixers.build_mixer(name, use_short_conv=True, conv_size=3)
    assert layer.short_conv and layer.conv_width == 3
  layer = mixers.build_mixer("lightnet", causal=False, num_heads=2, gate_rank=4, short_conv=True)
  with pytest.raises(ValueError, match="short_conv=True convolves along a 1-D sequence"):
    jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros((1, 3, 5, D))))
