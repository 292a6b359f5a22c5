"""Softmax attention layer (the baseline): multi-head or grouped-query, rotary positions, KV cache."""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers import ops
from mixers.layers import common
from mixers.layers.decode_cache import cached_recurrence, check_decode, decode_positions
from mixers.layers.rotary import apply_rotary
from mixers.registry import register


@register("attention")
class Attention(nn.Module):
  """o = softmax(q k^T / sqrt(D)) v per head, then an output projection. x `[B,T,d_model]`.

  Decoding keeps keys and values (the cached state) for as many positions as the input given to
  `init(..., decode=True)`.
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
    check_decode(self, decode)
    mask = common.check_mask(mask, x.shape)
    b, t, d_model = x.shape
    head_dim = self.head_dim or d_model // self.num_heads
    kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads:
      raise ValueError(f"num_kv_heads={kv_heads} must divide num_heads={self.num_heads}")
    proj = lambda heads, name: common.projection((heads, head_dim), ("embed", "heads", "kv"), name=name,
                                                 dtype=self.dtype)
    q, k, v = proj(self.num_heads, "query")(x), proj(kv_heads, "key")(x), proj(kv_heads, "value")(x)
    pos = decode_positions(self, b, t, decode=decode)
    if self.rotary:
      q, k = apply_rotary(q, pos, self.rotary_base), apply_rotary(k, pos, self.rotary_base)

    def attend(kv_cache):
      if kv_cache is None:
        return ops.attention(q, k, v, causal=self.causal, mask=mask), None
      keys, values = (jax.lax.dynamic_update_slice(c, a.astype(c.dtype), (0, pos[0, 0], 0, 0))
                      for c, a in zip(kv_cache, (k, v)))
      visible = jnp.arange(keys.shape[1])[None, None, None, :] <= pos[:, None, :, None]  # [B,1,T,L]
      return ops.attention(q, keys, values, causal=False, mask=visible), (keys, values)

    empty_cache = lambda: (jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))
    o = cached_recurrence(self, attend, empty_cache, decode=decode)
    return common.projection(d_model, ("heads", "kv", "embed"), axis=(-2, -1), name="out", dtype=self.dtype)(o)
