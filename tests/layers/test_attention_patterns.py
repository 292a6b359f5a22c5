"""Attention patterns in the layers: Prefix-LM (`prefix_len`), block-causal (`block_size`), cross attention
(`context`), each against an independent computation, and decoding against the full forward."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixers
from mixers import ops
from mixers.layers import linear_family
from mixers.layers.retention import retnet_log_decays
from mixers.layers.rotary import apply_rotary
from mixers.ops import feature_maps
from tests.conftest import assert_close, random_variables

B, T, D, TK = 2, 13, 16, 7
NAMES = ("attention", "linear_attention", "gla", "retention")
SMALL = {"attention": dict(num_heads=2), "linear_attention": dict(num_heads=2), "gla": dict(num_heads=2, gate_rank=4),
         "retention": dict(num_heads=2)}
HAS_CONV = ("linear_attention", "gla")
PREFIX = jnp.array([6, 3])  # per sequence; decoding reads a prompt of max(PREFIX) tokens


def build(name, causal=True, conv=False, block_size=None):
  kw = dict(SMALL[name], causal=causal)
  if conv and name in HAS_CONV:
    kw["short_conv"] = True
  if block_size is not None:
    kw["block_size"] = block_size
  return mixers.build_mixer(name, **kw)


def inputs(seed=0, length=T):
  return jax.random.normal(jax.random.key(seed), (B, length, D))


@functools.lru_cache(maxsize=None)
def params(name, conv=False):
  """Random variables of the layer (the same for every causal, block_size and non-causal setting): the tests
  compare forms of one layer, or the layer with its math written out, so no test needs the init's values."""
  return random_variables(build(name, conv=conv), inputs())


@functools.lru_cache(maxsize=None)
def jitted(name, causal=True, conv=False, block_size=None):
  """(layer, jitted `apply(variables, x, kwargs)`, jitted decode step `(variables, cache, x, kwargs) -> (y, cache)`)."""
  layer = build(name, causal=causal, conv=conv, block_size=block_size)
  apply = jax.jit(lambda v, x, kw: layer.apply(v, x, **kw))
  step = jax.jit(lambda v, c, x, kw: layer.apply({**v, "cache": c}, x, decode=True, mutable=["cache"], **kw))
  return layer, apply, step


@functools.lru_cache(maxsize=None)
def empty_cache(name, conv=False, block_size=None):
  """The cache `init(x, decode=True)` makes for inputs shaped like `inputs()` (a context like x adds nothing to it)."""
  layer = jitted(name, True, conv, block_size)[0]
  return jax.jit(functools.partial(layer.init, decode=True))(jax.random.key(1), inputs())["cache"]


def forward(name, x, causal=True, conv=False, block_size=None, **kwargs):
  return jitted(name, causal, conv, block_size)[1](params(name, conv), x, kwargs)


def decode(name, chunks, conv=False, block_size=None, cache=None):
  """(outputs of decoding `chunks`, pairs (x chunk, kwargs), in order from `cache` (default: empty), the cache)."""
  step = jitted(name, True, conv, block_size)[2]
  cache = empty_cache(name, conv, block_size) if cache is None else cache
  outs = []
  for x, kwargs in chunks:
    out, state = step(params(name, conv), cache, x, kwargs)
    outs.append(out)
    cache = state["cache"]
  return jnp.concatenate(outs, axis=1), cache


def influence(layer, variables, x, **kwargs):
  """`[B,T,T]`: |d (w_t . y_t) / d e_s| where x_s moves by e_s u_s (random directions u, w): nonzero exactly where
  y_t depends on x_s (almost surely), at T tangents instead of T * d_model."""
  u, w = inputs(11), inputs(12)
  f = lambda e: jnp.sum(w * layer.apply(variables, x + e[..., None] * u, **kwargs), axis=-1)  # [B,T]
  jac = jax.jit(jax.jacfwd(f))(jnp.zeros(x.shape[:2]))  # [B,T,B,T]
  return np.stack([np.abs(np.asarray(jac[b, :, b])) for b in range(x.shape[0])])


def assert_pattern(inf, visible, what):
  """Outputs depend exactly on the inputs that `visible` `[B,T,T]` marks."""
  floor = 1e-6 * inf.max()
  assert np.all(inf[~visible] <= floor), f"{what}: an output reads a hidden input"
  assert np.all(inf[visible] > floor), f"{what}: an output ignores a visible input"


# Prefix-LM


@pytest.mark.parametrize("name", NAMES)
def test_prefix_len_T_and_block_size_T_equal_the_noncausal_layer(name):
  """prefix_len = T, and one block of T tokens, show every token to every token: the non-causal layer with the same
  parameters (no short convs, whose causal and centred forms differ)."""
  x = inputs()
  y = forward(name, x, causal=False)
  assert_close(forward(name, x, prefix_len=T), y, 1e-5, f"{name} prefix_len=T vs non-causal")
  assert_close(forward(name, x, block_size=T), y, 1e-5, f"{name} block_size=T vs non-causal")


@pytest.mark.parametrize("name", NAMES)
def test_prefix_len_visibility(name):
  """With prefix_len P (per sequence) y_t depends on x_s exactly when s <= t or both t, s < P (short convs
  included: they read earlier tokens only)."""
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  p = np.asarray(PREFIX)[:, None, None]
  visible = (s <= t) | ((t < p) & (s < p))
  inf = influence(build(name, conv=True), params(name, True), inputs(), prefix_len=PREFIX)
  assert_pattern(inf, visible, f"{name} prefix_len")


@pytest.mark.parametrize("name", NAMES)
def test_prefix_prefill_then_decode_equals_forward(name):
  """A prompt read with prefix_len (per sequence) fills the cache; token by token decoding then reproduces the full
  forward with the same prefix_len at every position."""
  x = inputs()
  n = int(PREFIX.max())
  chunks = [(x[:, :n], dict(prefix_len=PREFIX))] + [(x[:, i:i + 1], {}) for i in range(n, T)]
  out, _ = decode(name, chunks, conv=True)
  assert_close(out, forward(name, x, conv=True, prefix_len=PREFIX), 1e-5, f"{name} prefix_len decode vs forward")


# Block-causal


@pytest.mark.parametrize("name", NAMES)
def test_block_causal_visibility(name):
  """With block_size b, y_t depends on x_s exactly when s // b <= t // b (short convs included)."""
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  visible = np.broadcast_to((s // 4 <= t // 4)[None], (B, T, T))
  inf = influence(build(name, conv=True, block_size=4), params(name, True), inputs())
  assert_pattern(inf, visible, f"{name} block_size=4")


@pytest.mark.parametrize("name", NAMES)
def test_block_causal_decode_equals_forward(name):
  """Decoding block by block (a one-block prompt, then whole blocks, then a last partial block) reproduces the full
  forward; a chunk that starts inside a block raises, or gives NaN under jit."""
  x = inputs()
  out, _ = decode(name, [(x[:, i:i + 4], {}) for i in range(0, T, 4)], conv=True, block_size=4)
  assert_close(out, forward(name, x, conv=True, block_size=4), 1e-5, f"{name} block decode vs forward")
  _, cache = decode(name, [(x[:, :4], {}), (x[:, 4:5], {})], conv=True, block_size=4)
  layer, _, step = jitted(name, True, True, 4)
  assert np.all(np.isnan(step(params(name, True), cache, x[:, 5:6], {})[0]))
  if name in ("attention", "gla"):  # the two code paths (the KV cache, the linear family's state), run eagerly
    with pytest.raises(ValueError, match="must start at a block boundary"):
      layer.apply({**params(name, True), "cache": cache}, x[:, 5:6], decode=True, mutable=["cache"])


# Cross attention


def cross_reference(name, params, x, context, causal):
  """The layer's math written out: q from x, k and v (and GLA's decays) from the context, the op, the output."""
  proj = lambda a, n: jnp.einsum("btd,dhk->bthk", a, params[n]["kernel"])
  q, k, v = proj(x, "query"), proj(context, "key"), proj(context, "value")
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  output_path = lambda o: linear_family.OutputPath().apply({"params": params["output"]}, o, x)
  if name == "attention":
    if causal:  # rotary only where the two sequences share positions
      q, k = apply_rotary(q, pos), apply_rotary(k, pos)
    o = ops.attention(q, k, v, causal=causal)
    return jnp.einsum("bthk,hkd->btd", o, params["out"]["kernel"])
  if name == "linear_attention":
    phi = feature_maps.get("elu")
    o = ops.linear_attention(phi(q), phi(k), v, causal=causal, normalize=True, scale=1.0)
    return jnp.einsum("bthk,hkd->btd", o, params["output"]["out"]["kernel"])
  if name == "gla":
    low = context @ params["gate_down"]["kernel"]
    logits = jnp.einsum("btr,rhk->bthk", low, params["gate_up"]["kernel"]) + params["gate_up"]["bias"]
    log_decay = jax.nn.log_sigmoid(logits) / 16.0
    return output_path(ops.linear_attention(q, k, v, causal=causal, log_decay=log_decay))
  q, k = apply_rotary(q, pos), apply_rotary(k, pos)
  return output_path(ops.linear_attention(q, k, v, causal=causal, log_decay=jnp.asarray(retnet_log_decays(2))))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_cross_attention_equals_the_op_on_projections(name, causal):
  """context: the layer equals the op on q from x and k, v from the context with the same parameters. Non-causal
  attention and linear attention (no decay) read a context of another length."""
  tk = TK if not causal and name in ("attention", "linear_attention") else T
  x, context = inputs(), inputs(5, tk)
  reference = jax.jit(functools.partial(cross_reference, name, causal=causal))
  assert_close(forward(name, x, causal=causal, context=context),
               reference(nn.unbox(params(name))["params"], x, context), 1e-5, f"{name} causal={causal} cross")


@pytest.mark.parametrize("name", NAMES)
def test_causal_cross_attention_is_causal_and_decodes(name):
  """Target t reads sources s <= t: changing later context tokens changes no earlier output. Decoding token by token
  with the context token beside each x token reproduces the full forward."""
  x, context = inputs(), inputs(5)
  y = forward(name, x, conv=True, context=context)
  changed = forward(name, x, conv=True, context=context.at[:, 7:].set(inputs(9)[:, 7:]))
  np.testing.assert_allclose(y[:, :7], changed[:, :7], atol=1e-6, rtol=1e-6)
  assert not np.allclose(y[:, 7:], changed[:, 7:])
  chunks = [(x[:, i:i + 1], dict(context=context[:, i:i + 1])) for i in range(T)]
  assert_close(decode(name, chunks, conv=True)[0], y, 1e-5, f"{name} causal cross decode vs forward")


def test_noncausal_cross_attention_reads_each_target_token_alone():
  """Non-causal cross attention has no decode mode: target t reads x_t and the whole context only, so a chunk of
  new target tokens with the whole context gives the full forward's outputs there."""
  x, context = inputs(), inputs(5, TK)
  y = forward("attention", x, causal=False, context=context)
  assert_close(forward("attention", x[:, 4:], causal=False, context=context), y[:, 4:], 1e-5, "target chunk")


@pytest.mark.parametrize("name", ["attention", "linear_attention"])
def test_cross_attention_context_mask(name):
  """Padded context tokens (context_mask False) change nothing: the same as the context without them."""
  x, context = inputs(), inputs(5, TK)
  padded = jnp.concatenate([context, jnp.full((B, 3, D), 100.0)], axis=1)
  context_mask = jnp.broadcast_to(jnp.arange(TK + 3)[None, :] < TK, (B, TK + 3))
  assert_close(forward(name, x, causal=False, conv=True, context=padded, context_mask=context_mask),
               forward(name, x, causal=False, conv=True, context=context), 1e-5, f"{name} context_mask")


def test_bad_patterns_and_contexts():
  x = inputs()
  variables = params("gla")
  noncausal = lambda name: build(name, causal=False)
  with pytest.raises(ValueError, match="prefix_len .* needs causal=True"):
    noncausal("gla").apply(variables, x, prefix_len=3)
  with pytest.raises(ValueError, match="block_size=4 .* needs causal=True"):
    build("attention", causal=False, block_size=4).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="two different masks"):
    build("gla", block_size=4).apply(variables, x, prefix_len=3)
  with pytest.raises(ValueError, match="prefix_len must be an int or an int array"):
    build("gla").apply(variables, x, prefix_len=jnp.ones((B, T), jnp.int32))
  with pytest.raises(ValueError, match=r"context must have x's length T=13 \(its decays"):
    noncausal("gla").apply(variables, x, context=inputs(5, TK))
  variables = params("retention")
  with pytest.raises(ValueError, match=r"context must have x's length T=13 \(its decays"):
    noncausal("retention").apply(variables, x, context=inputs(5, TK))
  variables = params("attention")
  with pytest.raises(ValueError, match=r"context must have x's length T=13 \(causal cross attention"):
    build("attention").apply(variables, x, context=inputs(5, TK))
  with pytest.raises(ValueError, match=r"context must have shape \[B,Tk,d_model\] = \(2, Tk, 16\)"):
    noncausal("attention").apply(variables, x, context=jnp.ones((B, TK, 8)))
  with pytest.raises(ValueError, match="context_mask given without a context"):
    build("attention").apply(variables, x, context_mask=jnp.ones((B, T), bool))
  with pytest.raises(ValueError, match="decode=True with a context needs causal=True"):
    noncausal("attention").init(jax.random.key(0), x, context=inputs(5, TK), decode=True)
