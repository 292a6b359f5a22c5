"""Channel mixers: the position-wise MLP and GLU of a block."""
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers.layers import common
from mixers.registry import register


@register("mlp", kind="channel")
class MLP(nn.Module):
  """y = act(x W1) W2, hidden width expansion * d_model."""
  expansion: float = 4.0
  activation: Callable = jax.nn.gelu
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    hidden = int(x.shape[-1] * self.expansion)
    h = self.activation(common.projection(hidden, ("embed", "mlp"), name="up", dtype=self.dtype)(x))
    return common.projection(x.shape[-1], ("mlp", "embed"), name="down", dtype=self.dtype)(h)


@register("glu", kind="channel")
class GLU(nn.Module):
  """y = (act(x W1) * x W3) W2 (SwiGLU with the default activation), hidden width expansion * d_model."""
  expansion: float = 8 / 3
  activation: Callable = jax.nn.silu
  multiple_of: int = 8
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    hidden = int(x.shape[-1] * self.expansion)
    hidden = -(-hidden // self.multiple_of) * self.multiple_of
    gate = self.activation(common.projection(hidden, ("embed", "mlp"), name="gate", dtype=self.dtype)(x))
    up = common.projection(hidden, ("embed", "mlp"), name="up", dtype=self.dtype)(x)
    return common.projection(x.shape[-1], ("mlp", "embed"), name="down", dtype=self.dtype)(gate * up)
