"""Retention (RetNet / Lightning style): linear attention with a fixed decay per head."""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mixers.layers import common, linear_family
from mixers.layers.decode_cache import check_decode, segment_positions
from mixers.layers.rotary import apply_rotary
from mixers.registry import register


def retnet_log_decays(num_heads):
  """log(gamma_h), gamma_h = 1 - 2^(-5-h): head h forgets over about 2^(5+h) tokens."""
  return np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads)))).astype(np.float32)


@register("retention")
class Retention(nn.Module):
  """S_t = gamma_h S_{t-1} + k_t v_t^T, o_t = q_t^T S_t / sqrt(D) (rotary q, k); per-head norm, swish gate.

  Non-causal: weights gamma_h^|t-s|. Decoding keeps S in the cache: O(1) per token. num_heads / head_dim
  (default d_model // num_heads); norm_eps: of the per-head RMSNorm. short_conv, conv_width (fla's use_short_conv,
  conv_size): depthwise convs + SiLU on the q, k, v projections before rotary, centred when non-causal; they
  restart at segment boundaries and keep their window in the decode cache. block_size (causal only): block-causal,
  a token reads its whole block and every earlier block; decoding, each chunk starts at a block boundary; short
  convs stay causal. dtype: computation (None: promote x and the parameters); param_dtype: the parameters'.
  """
  num_heads: int = 4
  head_dim: Optional[int] = None
  causal: bool = True
  block_size: Optional[int] = None
  rotary: bool = True
  short_conv: bool = False
  conv_width: int = 4
  norm_eps: float = 1e-6
  chunk_size: int = 64
  impl: str = "auto"
  dtype: Optional[common.Dtype] = None
  param_dtype: common.Dtype = jnp.float32

  aliases = linear_family.FLA_ALIASES

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False, prefix_len=None, context=None, context_mask=None,
               segment_ids=None):
    """y `[B,T,d_model]` from x `[B,T,d_model]`.

    mask: `[B,T]` bool, True at real tokens (padded tokens neither write nor decay the state), or None.
    decode: causal only; continue from the `cache` collection (the protocol: `mixers.layers.decode_cache`).
      O(1) state per token.
    prefix_len: None, int or `[B]` ints, causal only (Prefix-LM, as in `LinearAttention`): within the prefix the
      weights are gamma_h^|t-s|.
    context: `[B,Tk,d_model]` or None: cross attention, q from x, k and v from the context, rotary at the same
      positions on both. The decays gamma_h^|t-s| pair target t with source t, so Tk == T (causal: sources
      s <= t). context_mask: `[B,Tk]` bool, True at real context tokens (padded ones neither write nor decay).
    segment_ids: `[B,T]` ints or None (packed sequences; a segment is a run of equal ids): each segment is mixed as
      its own sequence (state, short convs and rotary positions restart); decoding, the chunk's first segment
      continues the cache and later chunks continue the last segment. Not with prefix_len, block_size or context.
    """
    common.check_x(self, x)
    common.check_cross_decode(self, decode, context)
    check_decode(self, decode)
    common.check_patterns(self, prefix_len=prefix_len, block_size=self.block_size)
    mask = common.check_mask(mask, x.shape)
    segment_ids = common.check_segment_ids(self, segment_ids, x.shape, prefix_len=prefix_len,
                                           block_size=self.block_size, context=context)
    _, source_mask = common.check_context(self, x, context, context_mask, mask, aligned=True)
    b, t, d_model = x.shape
    head_dim = common.head_width(self.num_heads, self.head_dim, d_model)
    if self.rotary and head_dim % 2:
      raise ValueError(f"rotary positions need an even head_dim, got head_dim={head_dim} (d_model={d_model}, "
                       f"num_heads={self.num_heads})")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = linear_family.qkv_projections(x, self.num_heads, head_dim, head_dim, context=context, **kw)
    if self.short_conv:
      q, k, v = linear_family.short_convs(q, k, v, causal=self.causal, width=self.conv_width, mask=mask,
                                          kv_mask=source_mask, decode=decode, segment_ids=segment_ids, **kw)
    pos, first = segment_positions(self, segment_ids, b, t, decode=decode)
    if self.rotary:
      q, k = apply_rotary(q, pos - first), apply_rotary(k, pos - first)
    k, v = linear_family.mask_tokens(source_mask, k, v)
    log_decay = jnp.asarray(retnet_log_decays(self.num_heads))
    if source_mask is not None:  # padded tokens neither write nor decay the state
      log_decay = log_decay * source_mask[..., None].astype(jnp.float32)
    o = linear_family.attend(self, q, k, v, decode=decode, causal=self.causal, log_decay=log_decay,
                             prefix_len=prefix_len, block_size=self.block_size, start=pos[0, 0],
                             segment_ids=segment_ids, chunk_size=self.chunk_size, impl=self.impl)
    return linear_family.OutputPath(norm=True, gate=True, norm_eps=self.norm_eps, name="output", **kw)(o, x)
