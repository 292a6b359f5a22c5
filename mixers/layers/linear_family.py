"""Pieces shared by the layers of the linear-attention family: per-head projections and the output path."""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers.layers import common


def heads_projection(num_heads, head_dim, name, dtype=None):
  """x `[B,T,d_model]` -> `[B,T,H,D]`, kernel axes (embed, heads, kv)."""
  return common.projection((num_heads, head_dim), ("embed", "heads", "kv"), name=name, dtype=dtype)


def conv_heads(x, name, *, causal, width, mask, decode):
  """Short depthwise conv over time on a `[B,T,H,D]` tensor (channels = H*D)."""
  b, t, h, d = x.shape
  y = common.ShortConv(width=width, causal=causal, channel_axis="heads", name=name)(
      x.reshape(b, t, h * d), mask=mask, decode=decode)
  return y.reshape(b, t, h, d)


def mask_tokens(mask, *xs):
  """Zeroes padded tokens (mask `[B,T]` False) of each `[B,T,...]` tensor; None passes through."""
  if mask is None:
    return xs
  return tuple(None if x is None else x * mask.reshape(mask.shape + (1,) * (x.ndim - 2)).astype(x.dtype)
               for x in xs)


class OutputPath(nn.Module):
  """o `[B,T,H,V]` -> optional per-head RMSNorm -> optional swish gate from x -> projection to d_model."""
  norm: bool = True
  gate: bool = True
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, o, x):
    b, t, h, dv = o.shape
    if self.norm:
      o = common.RMSNorm(axis_name="kv", name="head_norm")(o)
    if self.gate:
      g = common.projection((h, dv), ("embed", "heads", "kv"), name="gate", dtype=self.dtype)(x)
      o = o * jax.nn.silu(g.astype(jnp.float32)).astype(o.dtype)
    return common.projection(x.shape[-1], ("heads", "kv", "embed"), axis=(-2, -1), name="out", dtype=self.dtype)(o)
