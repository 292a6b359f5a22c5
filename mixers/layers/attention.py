"""Softmax attention layer (the baseline): multi-head or grouped-query, rotary positions, KV cache."""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers import ops
from mixers.layers import common
from mixers.layers.rotary import apply_rotary
from mixers.registry import register


@register("attention")
class Attention(nn.Module):
  """o = softmax(q k^T / sqrt(D)) v per head, then an output projection. x `[B,T,d_model]`.

  Decoding keeps keys and values for as many positions as the input given to `init(..., decode=True)`.
  """
  num_heads: int = 4
  head_dim: Optional[int] = None
  num_kv_heads: Optional[int] = None
  causal: bool = True
  rotary: bool = True
  rotary_base: float = 10000.0
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False):
    b, t, d_model = x.shape
    head_dim = self.head_dim or d_model // self.num_heads
    kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads:
      raise ValueError(f"num_kv_heads={kv_heads} must divide num_heads={self.num_heads}")
    if decode and not self.causal:
      raise ValueError("decode=True needs causal=True")
    proj = lambda heads, name: common.projection((heads, head_dim), ("embed", "heads", "kv"), name=name,
                                                 dtype=self.dtype)
    q, k, v = proj(self.num_heads, "query")(x), proj(kv_heads, "key")(x), proj(kv_heads, "value")(x)
    pos = common.decode_positions(self, b, t, decode=decode)
    if self.rotary:
      q, k = apply_rotary(q, pos, self.rotary_base), apply_rotary(k, pos, self.rotary_base)
    key_mask = mask
    causal = self.causal
    if decode and self.has_variable("cache", "cached_key"):
      k, v, key_mask = self._extend_cache(k, v, pos)
      causal = False  # the cache mask already hides future positions
    elif decode:
      self._extend_cache(k, v, pos, create_only=True)
    o = ops.attention(q, k, v, causal=causal, mask=key_mask)
    return common.projection(d_model, ("heads", "kv", "embed"), axis=(-2, -1), name="out", dtype=self.dtype)(o)

  def _extend_cache(self, k, v, pos, create_only=False):
    """Writes the new keys/values at their positions; returns all cached keys/values and a `[B,1,T,L]` mask."""
    b, _, h, d = k.shape
    length = pos.shape[1]
    ck = self.variable("cache", "cached_key", jnp.zeros, (b, length, h, d), k.dtype)
    cv = self.variable("cache", "cached_value", jnp.zeros, (b, length, h, v.shape[-1]), v.dtype)
    if create_only:
      return None
    start = pos[0, 0]
    ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, start, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, start, 0, 0))
    visible = jnp.arange(ck.value.shape[1])[None, None, None, :] <= pos[:, None, :, None]
    return ck.value, cv.value, visible
