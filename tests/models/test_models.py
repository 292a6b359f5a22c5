"""Models built from ConfigDicts: language model, classifiers, hybrids, decoding, NNX bridge."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixers import models
from tests.conftest import assert_close, random_variables


def lm_config(mixer="gla,attention", **overrides):
  c = models.default_config()
  c.mixer, c.d_model, c.num_layers, c.vocab_size = mixer, 32, 2, 50
  c.mixer_kwargs.num_heads = 2
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def hybrid_lm():
  model = models.build_model(lm_config())
  tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, 50)
  return model, jax.jit(model.init)(jax.random.key(1), tokens), tokens


def test_hybrid_lm_layers_and_logical_axes(hybrid_lm):
  model, variables, tokens = hybrid_lm
  logits = jax.eval_shape(model.apply, variables, tokens)
  assert logits.shape == (2, 11, 50) and logits.dtype == jnp.float32
  params = variables["params"]["backbone"]
  assert "gate_down" in params["block_0"]["mixer"] and "cached_key" not in params["block_1"]["mixer"]
  assert "query" in params["block_1"]["mixer"]
  names = {tuple(p.names) for p in jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
           if isinstance(p, nn.Partitioned)}
  assert ("vocab", "embed") in names and ("embed", "heads", "kv") in names and ("embed", "mlp") in names


def test_lm_causal_and_decodes(hybrid_lm):
  model, variables, tokens = hybrid_lm
  apply = jax.jit(model.apply)
  logits = apply(variables, tokens)
  changed = apply(variables, tokens.at[:, 6:].set(7))
  np.testing.assert_allclose(logits[:, :6], changed[:, :6], atol=1e-5)
  cache = jax.jit(functools.partial(model.init, decode=True))(jax.random.key(1), tokens)["cache"]
  step = jax.jit(lambda c, t: model.apply({**variables, "cache": c}, t, decode=True, mutable=["cache"]))
  outs = []
  for t in range(tokens.shape[1]):
    out, mut = step(cache, tokens[:, t:t + 1])
    cache = mut["cache"]
    outs.append(out)
  assert_close(jnp.concatenate(outs, axis=1), logits, 1e-5)


def test_lm_prefix_len_reads_the_prompt_both_ways_then_decodes(hybrid_lm):
  """prefix_len P in every layer: logits before P see the rest of the prompt, none sees past its own position after
  P; a prompt prefilled with prefix_len then token by token decoding equals the forward; the remat and scanned
  backbones pass it on alike; a mixer that cannot read it is a ValueError naming those that can."""
  model, variables, tokens = hybrid_lm
  p = 6
  apply = jax.jit(lambda v, t, p: model.apply(v, t, prefix_len=p))
  logits = apply(variables, tokens, p)
  changed = apply(variables, tokens.at[:, p - 1].set((tokens[:, p - 1] + 1) % 50), p)
  assert not np.allclose(logits[:, 0], changed[:, 0], atol=1e-5)
  later = apply(variables, tokens.at[:, p + 1:].set(7), p)
  np.testing.assert_allclose(logits[:, :p + 1], later[:, :p + 1], atol=1e-5)
  cache = jax.jit(functools.partial(model.init, decode=True))(jax.random.key(1), tokens)["cache"]
  run = lambda c, t, **kw: model.apply({**variables, "cache": c}, t, decode=True, mutable=["cache"], **kw)
  out, mut = jax.jit(functools.partial(run, prefix_len=p))(cache, tokens[:, :p])
  outs, cache, step = [out], mut["cache"], jax.jit(run)
  for t in range(p, tokens.shape[1]):
    out, mut = step(cache, tokens[:, t:t + 1])
    outs.append(out)
    cache = mut["cache"]
  assert_close(jnp.concatenate(outs, axis=1), logits, 1e-5, "prefix-LM decode")
  per_row = jnp.array([p, 2])
  expected = apply(variables, tokens, per_row)
  params = nn.unbox(variables["params"])
  for extra in (dict(remat=True), dict(scan_layers=True, remat=True)):
    other = models.build_model(lm_config(**extra))
    other_params = params
    if extra.get("scan_layers"):
      other_params = {**params, "backbone": models.stack_layers(params["backbone"], 2, 2)}
    assert_close(jax.jit(lambda v, t, p: other.apply(v, t, prefix_len=p))({"params": other_params}, tokens, per_row),
                 expected, 1e-5, f"prefix_len with {extra}")
  with pytest.raises(ValueError, match=r"mixer\(s\) \['mamba2'\] do not take it; mixers that do: attention, gla"):
    mamba = models.build_model(lm_config("gla,mamba2"))
    mamba.init(jax.random.key(1), tokens, prefix_len=p)


def test_image_classifier_trains():
  """A LightNet image classifier with MD-TPE lowers its loss on a small batch in a few steps."""
  c = models.default_config()
  c.update(dict(kind="classifier", causal=False, mixer="lightnet", d_model=32, num_layers=1, num_classes=4,
                patch_size=4, image_size=(16, 16), positional="md_tpe", pool="mean"))
  c.mixer_kwargs.num_heads = 2
  c.positional_kwargs.num_heads = 2
  model = models.build_model(c)
  images = jax.random.randint(jax.random.key(0), (8, 16, 16, 3), 0, 256).astype(jnp.uint8)
  labels = jnp.arange(8) % 4
  params = jax.jit(model.init)(jax.random.key(1), images)["params"]
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def train_step(params, state):
    loss, g = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, images), labels).mean())(params)
    updates, state = opt.update(g, state)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(15):
    params, state, loss = train_step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_token_classifier_masks_padding(pool):
  c = models.default_config()
  c.update(dict(kind="classifier", causal=False, mixer="linear_attention", d_model=16, num_layers=1,
                vocab_size=20, num_classes=3, pool=pool, positional="learned", max_len=16))
  c.mixer_kwargs.num_heads = 2
  model = models.build_model(c)
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 1, 20)
  variables = jax.jit(model.init)(jax.random.key(3), tokens)
  mask = jnp.arange(10)[None] < jnp.array([[10], [6]])
  padded, alone = jax.jit(lambda v: (model.apply(v, tokens.at[1, 6:].set(0), mask=mask),
                                     model.apply(v, tokens[1:, :6])))(variables)
  assert padded.shape == (2, 3)
  assert_close(padded[1], alone[0], 1e-5)


def test_nnx_bridge():
  """mixers.nnx.build_model: the Linen model as an initialised nnx.Module, no flags to set."""
  from flax import nnx
  import mixers.nnx
  model = models.build_model(lm_config("retention"))
  tokens = jnp.ones((1, 5), jnp.int32)
  bridged = mixers.nnx.build_model(lm_config("retention"), rngs=nnx.Rngs(0), sample_input=tokens)
  logits = nnx.jit(lambda m, t: m(t))(bridged, tokens)
  assert logits.shape == (1, 5, 50)
  params = nnx.to_pure_dict(nnx.state(bridged, nnx.Param))
  assert_close(logits, jax.jit(model.apply)({"params": params}, tokens), 1e-6)


@pytest.mark.parametrize("update, match", [
    (dict(mixer="hydra"), r"\['hydra'\] are non-causal"),
    (dict(mixer="gla,transformer"), "unknown mixer 'transformer'; valid names: attention"),
    (dict(channel_mixer="moe"), "unknown channel_mixer 'moe'; valid: none, glu, mlp, monarch_mlp"),
    (dict(kind="seq2seq"), "model.kind must be one of"),
])
def test_bad_configs(update, match):
  c = lm_config()
  c.update(update)
  with pytest.raises(ValueError, match=match):
    models.build_model(c)


def test_unknown_config_key_lists_valid_keys():
  c = lm_config()
  c.mixr = "gla"
  with pytest.raises(ValueError, match="unknown model config keys \\['mixr'\\]; valid keys: causal, "):
    models.build_model(c)


SMALL_MIXERS = {"attention": dict(num_heads=2), "linear_attention": dict(num_heads=2), "retention": dict(num_heads=2),
                "gla": dict(num_heads=2, gate_rank=4), "mamba2": dict(head_dim=8, state_dim=8), "m2": dict(max_len=16),
                "lightnet": dict(num_heads=2, gate_rank=4), "hydra": dict(head_dim=8, state_dim=8),
                "vssd": dict(head_dim=8, state_dim=8)}


@pytest.mark.parametrize("kind", ["lm", "classifier"])
def test_every_mixer_runs_sharded_on_a_mesh(kind):
  """Every registered mixer in a hybrid model, its parameters placed on (data=2, fsdp=2, tensor=2) by their logical
  axes, equals 1 device (`init_sharded` itself: tests/test_sharding.py).

  A causal LM holds the causal mixers, a non-causal classifier the others.
  """
  from mixers import registry, sharding
  names = [n for n in registry.names("sequence") if registry.is_causal_capable(n) == (kind == "lm")]
  c = lm_config(",".join(names))
  c.update(dict(kind=kind, causal=kind == "lm", num_layers=len(names), d_model=32, num_classes=3))
  c.mixer_kwargs = {}
  c.per_mixer_kwargs = SMALL_MIXERS
  model = models.build_model(c)
  tokens = jax.random.randint(jax.random.key(0), (4, 16), 0, 50)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  variables = sharding.shard_params(random_variables(model, tokens), mesh)
  embedding = variables["params"]["embed"]["embedding"]
  assert embedding.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")  # (vocab, embed)
  with sharding.use_mesh(mesh):
    out = jax.jit(model.apply)(variables, tokens)
  assert_close(out, jax.jit(model.apply)(jax.device_get(variables), tokens), 1e-5)


def test_lightnet_block_configs():
  image, lm = models.lightnet_block_config("image"), models.lightnet_block_config("lm")
  assert image.mixer == lm.mixer == "lightnet"
  assert not image.causal and image.positional == "md_tpe" and lm.causal and not lm.positional
  config = models.default_config()
  config.update(lm)
  config.update(dict(d_model=16, num_layers=1, vocab_size=11))
  config.mixer_kwargs.update(dict(num_heads=2, gate_rank=4))
  model = models.build_model(config)
  tokens = jnp.arange(6)[None] % 11
  variables = jax.jit(model.init)(jax.random.key(0), tokens)
  assert jax.jit(model.apply)(variables, tokens).shape == (1, 6, 11)
  with pytest.raises(ValueError, match="task must be one of"):
    models.lightnet_block_config("video")
