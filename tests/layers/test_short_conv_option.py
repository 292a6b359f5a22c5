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
PREFILL, CUT = 5, 8  # decode: a 5-token prompt, then one token at a time; causality: tokens from 8 on change


def build(name, causal=True, **kw):
  layer = mixers.build_mixer(name, causal=causal, **{**CONFIGS[name], **kw})
  return layer, random_variables(layer, jnp.zeros((2, T, D)))


def alone(layer, variables, x, mask):
  """Each segment of IDS through the layer on its own (one batch of them, right-padded with masked tokens), put
  back in place: `[B,T,D]`."""
  places = [(b, s, e) for b, lengths in enumerate(LENGTHS)
            for s, e in zip(np.cumsum((0,) + lengths)[:-1], np.cumsum((0,) + lengths)[1:])]
  n = max(e - s for _, s, e in places)
  cut = lambda a: jnp.stack([jnp.pad(a[b, s:e], [(0, n - (e - s))] + [(0, 0)] * (a.ndim - 2)) for b, s, e in places])
  y = layer.apply(variables, cut(x), mask=cut(mask))
  rows = [[y[i, :e - s] for i, (b, s, e) in enumerate(places) if b == row] for row in range(len(LENGTHS))]
  return jnp.stack([jnp.concatenate(r) for r in rows])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_causal_short_conv(name, x64):
  """Future tokens change no past output; prompt + token-by-token decode equals the forward; packed rows equal
  their segments alone; the output differs from the same parameters without the convs."""
  layer, variables = build(name)
  plain = mixers.build_mixer(name, **{**CONFIGS[name], "short_conv": False})
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, T, D)))
  changed = x.at[:, CUT:].set(-x[:, CUT:] + 1.0)

  @jax.jit
  def forms(variables, x, changed, ids, mask):
    y, y_changed = jnp.split(layer.apply(variables, jnp.concatenate([x, changed])), 2)  # one program for both
    cache = layer.apply(variables, x[:, :PREFILL], decode=True, mutable=["cache"])[1]["cache"]  # the empty cache

    def step(cache, chunk):
      y, state = layer.apply({**variables, "cache": cache}, chunk, decode=True, mutable=["cache"])
      return state["cache"], y

    cache, prompt = step(cache, x[:, :PREFILL])
    _, tokens = jax.lax.scan(lambda c, xt: step(c, xt[:, None]), cache, jnp.swapaxes(x[:, PREFILL:], 0, 1))
    decoded = jnp.concatenate([prompt, jnp.swapaxes(tokens[:, :, 0], 0, 1)], axis=1)
    twice = lambda a: jnp.concatenate([a, a])
    packed, padded_changed = jnp.split(layer.apply(variables, jnp.concatenate([x, jnp.where(mask[..., None], x, 3.0)]),
                                                   segment_ids=twice(ids), mask=twice(mask)), 2)
    return y, y_changed, decoded, packed, padded_changed, alone(layer, variables, x, mask), plain.apply(variables, x)

  y, y_changed, decoded, packed, padded_changed, expected, without = forms(variables, x, changed, IDS, MASK)
  assert_close(y_changed[:, :CUT], y[:, :CUT], 1e-12, f"{name}: outputs before the changed tokens")
  assert not np.allclose(y_changed[:, CUT:], y[:, CUT:], atol=1e-3)
  assert_close(decoded, y, 1e-6, f"{name}: decoded vs forward")
  real = MASK[..., None]
  assert_close(packed * real, expected * real, 1e-6, f"{name}: packed vs segments alone")
  assert_close(padded_changed * real, packed * real, 1e-12, f"{name}: padded tokens changed")
  params = variables["params"]
  widths = {n: jax.tree.leaves(params[n]["kernel"])[0].shape for n in ("conv_q", "conv_k", "conv_v")}
  assert all(w[0] == 3 for w in widths.values()), widths
  assert not np.allclose(without, y, atol=1e-3), f"{name}: short_conv=True changes nothing"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_non_causal_packed_equals_alone(name, x64):
  """Centred convs: a packed row's segments equal the segments alone; they read neighbours on both sides."""
  layer, variables = build(name, causal=False)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, T, D)))
  changed = x.at[:, CUT:].set(-x[:, CUT:] + 1.0)

  @jax.jit
  def forms(variables, x, changed, ids, mask):
    y, y_changed = jnp.split(layer.apply(variables, jnp.concatenate([x, changed])), 2)
    return layer.apply(variables, x, segment_ids=ids, mask=mask), alone(layer, variables, x, mask), y, y_changed

  packed, expected, y, y_changed = forms(variables, x, changed, IDS, MASK)
  real = MASK[..., None]
  assert_close(packed * real, expected * real, 1e-6, f"non-causal {name}: packed vs segments alone")
  assert not np.allclose(y_changed[:, :CUT], y[:, :CUT], atol=1e-3)


def test_fla_names_and_grid_refusal():
  for name in CONFIGS:
    layer = mixers.build_mixer(name, use_short_conv=True, conv_size=3)
    assert layer.short_conv and layer.conv_width == 3
  layer = mixers.build_mixer("lightnet", causal=False, num_heads=2, gate_rank=4, short_conv=True)
  with pytest.raises(ValueError, match="short_conv=True convolves along a 1-D sequence"):
    jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros((1, 3, 5, D))))
