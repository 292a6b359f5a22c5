"""The library as a new user meets it: a light import, the wheel's contents, every mixer inside the user's own
`nn.scan`, bfloat16 parameters, NNX, bounded decode caches, clear errors for wrong arguments and shapes.

Every mixer runs at d_model 16 and T 8; the mixers share one module (`EveryMixer`) so each check compiles once.
"""
import runpy
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixers
from mixers import ops, registry
from tests.conftest import random_variables, rel_rms
from tests.layers.test_all_mixers import SMALL

REPO = Path(__file__).resolve().parents[1]
B, T, D = 2, 8, 16
NAMES = registry.names("sequence")
BF16_TOLERANCE = 0.02  # relative RMS error of bfloat16 parameters (and computation) against float32
X = jax.random.normal(jax.random.key(0), (B, T, D))


def build(mixer, **kwargs):
  return mixers.build_mixer(mixer, causal=registry.is_causal_capable(mixer), **{**SMALL[mixer], **kwargs})


class EveryMixer(nn.Module):
  """Every registered sequence mixer on the same x: {name: y}; `kwargs` go to each (e.g. param_dtype)."""
  kwargs: dict

  @nn.compact
  def __call__(self, x):
    return {name: build(name, name=name, **self.kwargs)(x) for name in NAMES}


def test_import_pulls_no_experiment_dependencies():
  code = ("import sys, mixers, mixers.layers, mixers.models, mixers.nnx; mixers.build_mixer('gla'); "
          "print(sorted(m for m in ('tensorflow_datasets', 'grain', 'matplotlib', 'experiments', 'configs') "
          "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"


def test_wheel_holds_mixers_only(monkeypatch):
  import setuptools  # pylint: disable=import-outside-toplevel
  captured = {}
  monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
  runpy.run_path(str(REPO / "setup.py"))
  assert captured["packages"] and all(p == "mixers" or p.startswith("mixers.") for p in captured["packages"])
  assert {"experiments", "test", "docs"} <= set(captured["extras_require"])


def test_every_mixer_in_the_users_own_scan():
  """nn.scan(nn.remat(Block)) over a block holding every mixer: parameters stack on a `layers` axis, which the
  default rules leave unsharded; the README's recipe."""

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      for name in NAMES:
        x = x + build(name, name=name)(nn.LayerNorm()(x))
      return x, None

  scanned = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=2,
                    metadata_params={nn.PARTITION_NAME: "layers"})()
  variables = random_variables(scanned, X, None)
  boxed = [p for p in jax.tree.leaves(variables, is_leaf=lambda a: isinstance(a, nn.Partitioned))
           if isinstance(p, nn.Partitioned)]
  assert boxed and all(p.names[0] == "layers" and p.value.shape[0] == 2 for p in boxed)
  assert set(variables["params"]) >= set(NAMES)
  from mixers.sharding.rules import DEFAULT_RULES  # pylint: disable=import-outside-toplevel
  assert ("layers", None) in DEFAULT_RULES
  y, _ = jax.jit(scanned.apply)(variables, X, None)
  assert y.shape == X.shape and bool(jnp.all(jnp.isfinite(y)))


def test_bfloat16_parameters_and_computation():
  """param_dtype=bfloat16 stores parameters in bfloat16 (m2's small implicit filter stays float32 unless
  filter_param_dtype=None) and, with dtype None, computes in float32; dtype=bfloat16 returns bfloat16. Both stay
  within BF16_TOLERANCE of float32 with the same (rounded) parameters."""
  f32, b16 = EveryMixer({}), EveryMixer({"param_dtype": jnp.bfloat16})
  abstract = jax.eval_shape(b16.init, jax.random.key(1), X)["params"]
  for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))[0]:
    keys = [getattr(k, "key", None) for k in path]
    want = jnp.float32 if keys[:2] == ["m2", "filter"] else jnp.bfloat16
    assert leaf.dtype == want, f"{keys}: {leaf.dtype}"
  all_b16 = jax.eval_shape(EveryMixer({"param_dtype": jnp.bfloat16, "dtype": jnp.bfloat16}).init, jax.random.key(1),
                           X)
  both = EveryMixer({"param_dtype": jnp.bfloat16, "dtype": jnp.bfloat16})

  @jax.jit
  def outputs(params):  # one program: float32, bfloat16 parameters, bfloat16 parameters and computation
    params = nn.unbox(params)
    rounded = jax.tree.map(lambda a, s: a.astype(s.dtype), params, nn.unbox(all_b16))
    params_b16 = jax.tree.map(lambda a, s: a.astype(s.dtype), params, nn.unbox({"params": abstract}))
    return f32.apply(params, X), b16.apply(params_b16, X), both.apply(rounded, X.astype(jnp.bfloat16))

  y32, y_params, y_both = outputs(random_variables(f32, X))
  errors = {}
  for name in NAMES:
    assert y_params[name].dtype == jnp.float32 and y_both[name].dtype == jnp.bfloat16, name
    errors[name] = (rel_rms(y_params[name], y32[name]), rel_rms(y_both[name], y32[name]))
  print({n: f"{a:.4f}/{b:.4f}" for n, (a, b) in errors.items()})
  assert all(max(e) < BF16_TOLERANCE for e in errors.values()), errors


def test_dtype_follows_flax_rules():
  """dtype=None promotes x and the parameters; dtype=bfloat16 computes and returns bfloat16 (m2 included)."""
  x16 = X.astype(jnp.bfloat16)
  out = jax.eval_shape(lambda: EveryMixer({}).init_with_output(jax.random.key(1), x16)[0])
  assert all(y.dtype == jnp.float32 for y in out.values())
  out = jax.eval_shape(lambda: EveryMixer({"dtype": jnp.bfloat16}).init_with_output(jax.random.key(1), X)[0])
  assert all(y.dtype == jnp.bfloat16 for y in out.values())


def test_nnx_wrap_jit_and_grad():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import mixers.nnx  # pylint: disable=import-outside-toplevel,redefined-outer-name
  for name in ("gla", "mamba2"):
    layer = mixers.nnx.build_mixer(name, rngs=nnx.Rngs(0), sample_input=X, **SMALL[name])
    def loss(m):
      y = m(X)
      return jnp.sum(y ** 2), y

    (_, y), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(layer)
    linen = build(name)
    params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    np.testing.assert_allclose(y, jax.jit(linen.apply)({"params": params}, X), rtol=1e-5, atol=1e-5)
    leaves = jax.tree.leaves(nnx.state(grads))
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)


def test_no_method_shadows_a_submodule():
  """nnx.bridge reads a linen module's top-level variables as attributes: a method of the same name breaks it."""
  params = jax.eval_shape(EveryMixer({}).init, jax.random.key(1), X)["params"]
  for name in NAMES:
    clash = set(params[name]) & {a for a in dir(registry.get(name)) if callable(getattr(registry.get(name), a))}
    assert not clash, f"{name}: methods {clash} share a name with submodules or parameters"


@pytest.mark.parametrize("name, kwargs, what", [
    ("attention", {}, "length of the input given to init"),
    ("m2", dict(max_len=T), f"max_len={T}"),
    ("linear_attention", dict(feature_map="cosformer", max_len=T), f"max_len={T}"),
])
def test_decoding_past_the_cache_raises_or_is_nan(name, kwargs, what):
  layer = mixers.build_mixer(name, causal=True, **{**SMALL[name], **kwargs})
  x = jnp.concatenate([X, X[:, :1]], axis=1)  # T + 1 tokens
  variables = random_variables(layer, X)
  cache = jax.jit(lambda: layer.init(jax.random.key(1), X, decode=True))()["cache"]  # T positions (attention: X's)
  decode = lambda c, xt: layer.apply({**variables, "cache": c}, xt, decode=True, mutable=["cache"])
  y, state = jax.jit(decode)(cache, x[:, :T])
  assert bool(jnp.all(jnp.isfinite(y)))
  with pytest.raises(ValueError, match=f"past the cache's capacity of {T} positions .*{what}"):
    decode(state["cache"], x[:, T:])
  y_jit, _ = jax.jit(decode)(state["cache"], x[:, T:])
  assert bool(jnp.all(jnp.isnan(y_jit)))
  assert mixers.models.decode_capacity(cache) == T


def test_generate_sizes_caches_from_the_model():
  """build_model gives m2 the model's max_len; generate refuses a budget past it before decoding."""
  from experiments import generate  # pylint: disable=import-outside-toplevel
  config = mixers.models.default_config()
  config.update(dict(mixer="m2", d_model=D, num_layers=1, vocab_size=11, max_len=T, channel_mixer="none"))
  model = mixers.models.build_model(config)
  assert model.backbone.mixer_kwargs[0]["max_len"] == T
  prompt = jnp.ones((1, 4), jnp.int32)
  params = random_variables(model, prompt)["params"]
  with pytest.raises(ValueError, match=f"need {T + 1} positions, but the model's decode caches hold {T}"):
    generate.generate(model, params, prompt, T - 3, rng=jax.random.key(0))


def test_wrong_arguments_and_shapes():
  from mixers.layers import Attention  # pylint: disable=import-outside-toplevel
  with pytest.raises(TypeError, match="unexpected keyword argument.*'num_head'.*did you mean num_heads.*valid "
                                      "arguments: num_heads"):
    Attention(num_head=2)
  with pytest.raises(ValueError, match="bad arguments for mixer 'gla'.*valid arguments: num_heads"):
    mixers.build_mixer("gla", heads=2)
  layer = build("gla")
  variables = random_variables(layer, X)
  with pytest.raises(ValueError, match=r"x must have shape \[B,T,d_model\], got \(8, 16\)"):
    layer.apply(variables, X[0])
  with pytest.raises(ValueError, match=r"mask must have shape \[B,T\] = \(2, 8\)"):
    layer.apply(variables, X, mask=jnp.ones((B, T + 1), bool))
  for name in ("attention", "linear_attention", "retention", "lightnet"):
    with pytest.raises(ValueError, match="num_heads=3 must divide d_model=16"):
      mixers.build_mixer(name, num_heads=3).init(jax.random.key(0), X)


@pytest.mark.parametrize("name", ["attention", "mamba2"])
def test_decoding_another_batch_size_names_both(name):
  layer = build(name)
  variables = random_variables(layer, X)
  cache = jax.jit(lambda x: layer.init(jax.random.key(1), x, decode=True))(X)["cache"]
  with pytest.raises(ValueError, match=f"decoding a batch of 1 sequences with a cache made for a batch of {B}"):
    layer.apply({**variables, "cache": cache}, X[:1, :1], decode=True, mutable=["cache"])


def test_aliases_of_other_libraries_names():
  assert mixers.build_mixer("mamba2", d_state=64, headdim=32, d_conv=3, ngroups=2, A_init_range=(1, 8)) == \
      mixers.build_mixer("mamba2", state_dim=64, head_dim=32, conv_width=3, num_groups=2, a_init_range=(1, 8))
  assert mixers.build_mixer("gla", use_short_conv=True, conv_size=3, gate_low_rank_dim=8).short_conv
  assert mixers.build_mixer("linear_attention", use_output_gate=True).output_gate
  with pytest.raises(ValueError, match="'d_state' and 'state_dim' name the same argument"):
    mixers.build_mixer("mamba2", d_state=8, state_dim=8)


def test_causal_defaults():
  """Every layer that can be causal defaults to causal=True; Hydra and VSSD are non-causal only. The ops keep the
  contract's defaults (attention: causal=False)."""
  for name in NAMES:
    cls = registry.get(name)
    assert cls.__dataclass_fields__["causal"].default == registry.is_causal_capable(name), name
  import inspect  # pylint: disable=import-outside-toplevel
  assert inspect.signature(ops.attention).parameters["causal"].default is False
