"""Retention (RetNet / Lightning style): linear attention with a fixed decay per head."""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mixers.layers import common, linear_family
from mixers.layers.decode_cache import check_decode, decode_positions
from mixers.layers.rotary import apply_rotary
from mixers.registry import register


def retnet_log_decays(num_heads):
  """log(gamma_h), gamma_h = 1 - 2^(-5-h): head h forgets over about 2^(5+h) tokens."""
  return np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads)))).astype(np.float32)


@register("retention")
class Retention(nn.Module):
  """S_t = gamma_h S_{t-1} + k_t v_t^T, o_t = q_t^T S_t / sqrt(D) (rotary q, k); per-head norm, swish gate.

  Non-causal: weights gamma_h^|t-s|. Decoding keeps S in the cache: O(1) per token.
  """
  num_heads: int = 4
  head_dim: Optional[int] = None
  causal: bool = True
  rotary: bool = True
  chunk_size: int = 64
  impl: str = "auto"
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False):
    check_decode(self, decode)
    mask = common.check_mask(mask, x.shape)
    b, t, d_model = x.shape
    head_dim = self.head_dim or d_model // self.num_heads
    q, k, v = linear_family.qkv_projections(x, self.num_heads, head_dim, head_dim, self.dtype)
    pos = decode_positions(self, b, t, decode=decode)
    if self.rotary:
      q, k = apply_rotary(q, pos), apply_rotary(k, pos)
    k, v = linear_family.mask_tokens(mask, k, v)
    log_decay = jnp.asarray(retnet_log_decays(self.num_heads))
    if mask is not None:  # padded tokens neither write nor decay the state
      log_decay = log_decay * mask[..., None].astype(jnp.float32)
    o = linear_family.attend(self, q, k, v, decode=decode, causal=self.causal, log_decay=log_decay,
                             chunk_size=self.chunk_size, impl=self.impl)
    return linear_family.OutputPath(norm=True, gate=True, dtype=self.dtype, name="output")(o, x)
