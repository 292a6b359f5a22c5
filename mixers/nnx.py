"""NNX entry points: the Linen mixers and models as `flax.nnx` modules, with no global flags to set.

    from flax import nnx
    import mixers.nnx

    layer = mixers.nnx.build_mixer("gla", rngs=nnx.Rngs(0), sample_input=jnp.ones((2, 16, 64)), num_heads=4)
    y = layer(x)                                   # x `[B,T,d_model]`, any B and T
    grads = nnx.grad(lambda m: (m(x) ** 2).sum())(layer)

The modules come through `flax.nnx.bridge.ToNNX`, initialised on `sample_input` under `nnx.jit` (parameters take
their shapes from it; one compiled init instead of op-by-op dispatch). Their parameters keep the Linen logical axis names as metadata; eager sharding is switched off while they are
created, so no mesh is needed (under a mesh, shard them with `nnx.get_partition_spec` and the rules in
`mixers.sharding`).
"""
from flax import nnx

from mixers import registry


def wrap(module, *, rngs, sample_input, **call_kwargs):
  """The Linen `module` as an initialised `nnx.Module` (rngs: `nnx.Rngs` or an int seed)."""
  if isinstance(rngs, int):
    rngs = nnx.Rngs(rngs)
  with nnx.use_eager_sharding(False):
    bridged = nnx.bridge.ToNNX(module, rngs=rngs)
    nnx.jit(lambda m, x: nnx.bridge.lazy_init(m, x, **call_kwargs))(bridged, sample_input)
  return bridged


def build_mixer(name, /, *, rngs, sample_input, **kwargs):
  """`mixers.build_mixer(name, **kwargs)` as an initialised `nnx.Module`; sample_input `[B,T,d_model]` (or
  `[..., d]` for a channel mixer) sets the parameters' shapes."""
  return wrap(registry.build_mixer(name, **kwargs), rngs=rngs, sample_input=sample_input)


def build_model(config, *, rngs, sample_input):
  """`mixers.models.build_model(config)` as an initialised `nnx.Module`; sample_input: tokens `[B,T]` (or images)."""
  from mixers.models import build_model as build_linen  # pylint: disable=import-outside-toplevel
  return wrap(build_linen(config), rngs=rngs, sample_input=sample_input)
