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
  dtype: Optional[common.Dtype] = None
  param_dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """y `[..., d]` from x `[..., d]` (position-wise)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = int(x.shape[-1] * self.expansion)
    h = self.activation(common.projection(hidden, ("embed", "mlp"), name="up", **kw)(x))
    return common.projection(x.shape[-1], ("mlp", "embed"), name="down", **kw)(h)


@register("glu", kind="channel")
class GLU(nn.Module):
  """y = (act(x W1) * x W3) W2 (SwiGLU with the default activation), hidden width expansion * d_model."""
  expansion: float = 8 / 3
  activation: Callable = jax.nn.silu
  multiple_of: int = 8
  dtype: Optional[common.Dtype] = None
  param_dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """y `[..., d]` from x `[..., d]` (position-wise)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = int(x.shape[-1] * self.expansion)
    hidden = -(-hidden // self.multiple_of) * self.multiple_of
    gate = self.activation(common.projection(hidden, ("embed", "mlp"), name="gate", **kw)(x))
    up = common.projection(hidden, ("embed", "mlp"), name="up", **kw)(x)
    return common.projection(x.shape[-1], ("mlp", "embed"), name="down", **kw)(gate * up)
