"""The backbone: pre-norm residual blocks of a sequence mixer and a channel mixer, then a final RMSNorm."""
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from mixers import registry
from mixers.layers.common import RMSNorm, constrain


def mixer_kwargs(name, kwargs, *, causal=None, dtype=None, grid_shape=None):
  """kwargs for mixer `name`, with causal / dtype / grid_shape filled in where the mixer has those fields."""
  fields = registry.get(name).__dataclass_fields__
  kwargs = dict(kwargs)
  if causal is not None and "causal" in fields:
    kwargs.setdefault("causal", causal)
  if dtype is not None and "dtype" in fields:
    kwargs.setdefault("dtype", dtype)
  if grid_shape is not None and "grid_shape" in fields:
    kwargs.setdefault("grid_shape", tuple(grid_shape))
  return kwargs


class Block(nn.Module):
  """x + mixer(norm(x)), then x + channel(norm(x)); x `[B,T,d_model]`."""
  mixer: str
  mixer_kwargs: Mapping[str, Any]
  channel_mixer: Optional[str]
  channel_kwargs: Mapping[str, Any]

  @nn.compact
  def __call__(self, x, mask=None, decode=False):
    mixer = registry.get(self.mixer, "sequence")(name="mixer", **self.mixer_kwargs)
    x = constrain(x + mixer(RMSNorm(name="mixer_norm")(x), mask=mask, decode=decode))
    if self.channel_mixer:
      channel = registry.get(self.channel_mixer, "channel")(name="channel", **self.channel_kwargs)
      x = constrain(x + channel(RMSNorm(name="channel_norm")(x)))
    return x


class SequenceModel(nn.Module):
  """`num_layers` blocks; `mixers[i]` names layer i's sequence mixer (a hybrid when they differ)."""
  mixers: Sequence[str]
  mixer_kwargs: Sequence[Mapping[str, Any]]
  channel_mixer: Optional[str] = "glu"
  channel_kwargs: Mapping[str, Any] = None
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False):
    block = nn.remat(Block, static_argnums=(3,)) if self.remat else Block
    for i, (name, kwargs) in enumerate(zip(self.mixers, self.mixer_kwargs)):
      x = block(name, kwargs, self.channel_mixer, dict(self.channel_kwargs or {}), name=f"block_{i}")(x, mask, decode)
    return RMSNorm(name="final_norm")(x)


def embed_init():
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed"))


def compute_dtype(name):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None}[name]
