"""Linear attention layer: feature-mapped queries and keys, optional normaliser, short conv and output gate."""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from mixers.layers import common, linear_family
from mixers.layers.decode_cache import check_decode, poison, segment_positions, within_capacity
from mixers.ops import feature_maps
from mixers.registry import register

FEATURE_MAPS = ("identity", "elu", "relu", "taylor", "cosformer", "hedgehog")


@register("linear_attention")
class LinearAttention(nn.Module):
  """o_t = sum_s phi(q_t)^T phi(k_s) v_s (/ sum_s phi(q_t)^T phi(k_s)), s <= t when causal.

  feature_map: identity | elu (elu+1) | relu | taylor (Based, 1 + q.k + (q.k)^2/2 on `feature_dim`-wide
  projections scaled by feature_dim^-1/4) | cosformer (relu, reweighted by cos(pi (t-s) / 2 max_len)) |
  hedgehog (learned [softmax(qW), softmax(-qW)]). Decoding keeps (S, z) in the cache: O(1) per token.
  num_heads / head_dim (default d_model // num_heads); short_conv, conv_width: short convs on q, k, v;
  output_gate / output_norm (norm_eps): the swish gate and per-head RMSNorm before the output projection;
  max_len: cosformer's position bound (longer inputs, and decoding past it, are refused). block_size (causal
  only): block-causal, a token reads its whole block of block_size tokens and every earlier block; decoding, each
  chunk starts at a block boundary (`decode_cache.block_aligned`); short convs stay causal. dtype: computation
  (None: promote x and the parameters); param_dtype: the parameters'.
  """
  num_heads: int = 4
  head_dim: Optional[int] = None
  feature_map: str = "elu"
  feature_dim: Optional[int] = None
  normalize: bool = True
  short_conv: bool = False
  conv_width: int = 4
  output_gate: bool = False
  output_norm: bool = False
  norm_eps: float = 1e-6
  causal: bool = True
  block_size: Optional[int] = None
  max_len: int = 8192
  eps: float = 1e-6
  chunk_size: int = 64
  impl: str = "auto"
  dtype: Optional[common.Dtype] = None
  param_dtype: common.Dtype = jnp.float32

  aliases = {**linear_family.FLA_ALIASES, "use_output_gate": "output_gate", "use_output_norm": "output_norm"}

  def _phi(self, x, pos, name):
    if self.feature_map == "taylor":
      return feature_maps.taylor_exp(x * x.shape[-1] ** -0.25)
    if self.feature_map == "cosformer":
      return feature_maps.cosformer(x, pos, self.max_len)
    if self.feature_map == "hedgehog":
      h, d = x.shape[-2:]
      identity = lambda key, shape: jnp.broadcast_to(jnp.eye(d), shape)
      w = self.param(name, nn.with_logical_partitioning(identity, ("heads", None, None)), (h, d, d), self.param_dtype)
      return feature_maps.hedgehog(x, w.astype(x.dtype))
    return feature_maps.get(self.feature_map)(x)

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False, prefix_len=None, context=None, context_mask=None,
               segment_ids=None):
    """y `[B,T,d_model]` from x `[B,T,d_model]`.

    mask: `[B,T]` bool, True at real tokens (padded tokens add nothing to the state), or None.
    decode: causal only; continue from the `cache` collection (the protocol: `mixers.layers.decode_cache`).
    prefix_len: None, int or `[B]` ints, causal only (Prefix-LM): the first prefix_len tokens read each other, later
      tokens everything before them. Decoding, it counts from the chunk's first token: a prompt read with prefix_len
      fills the cache and later chunks without it continue causally. Short convs stay causal.
    context: `[B,Tk,d_model]` or None (self attention): cross attention, q from x, k and v from the context through
      the same projections (and short convs, run over the context). Non-causal: any Tk without decay-like
      position weights (cosformer needs Tk == T); causal (target t reads sources s <= t): Tk == T, and decoding
      takes the context chunk that matches each x chunk. context_mask: `[B,Tk]` bool, True at real context tokens.
    segment_ids: `[B,T]` ints or None (packed sequences; a segment is a run of equal ids): each segment is mixed as
      its own sequence (state, short convs and cosformer's positions restart); decoding, the chunk's first segment
      continues the cache and later chunks continue the last segment. Not with prefix_len, block_size or context.
    """
    if self.feature_map not in FEATURE_MAPS:
      raise ValueError(f"unknown feature_map {self.feature_map!r}; valid: {', '.join(FEATURE_MAPS)}")
    common.check_x(self, x)
    common.check_cross_decode(self, decode, context)
    check_decode(self, decode)
    common.check_patterns(self, prefix_len=prefix_len, block_size=self.block_size)
    mask = common.check_mask(mask, x.shape)
    segment_ids = common.check_segment_ids(self, segment_ids, x.shape, prefix_len=prefix_len,
                                           block_size=self.block_size, context=context)
    source, source_mask = common.check_context(self, x, context, context_mask, mask,
                                               aligned=self.feature_map == "cosformer")
    b, t, d_model = x.shape
    head_dim = common.head_width(self.num_heads, self.head_dim, d_model)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = linear_family.qkv_projections(x, self.num_heads, self.feature_dim or head_dim, head_dim, context=context,
                                            **kw)
    if self.short_conv:
      q, k, v = linear_family.short_convs(q, k, v, causal=self.causal, width=self.conv_width, mask=mask,
                                          kv_mask=source_mask, decode=decode, segment_ids=segment_ids, **kw)
    pos, first = segment_positions(self, segment_ids, b, t, decode=decode)
    ok = None
    if self.feature_map == "cosformer":  # its reweighting holds for positions up to max_len only
      if t > self.max_len:
        raise ValueError(f"feature_map='cosformer' with max_len={self.max_len} reads at most {self.max_len} "
                         f"tokens, got x {tuple(x.shape)}")
      if decode:
        ok = within_capacity(self, jnp.max(pos - first) + 1, self.max_len, decode=True,
                             what=f"max_len={self.max_len}")
    q, k = self._phi(q, pos - first, "hedgehog_q"), self._phi(k, pos - first, "hedgehog_k")
    k, v = linear_family.mask_tokens(source_mask, k, v)
    phi_dim = q.shape[-1]
    scale = 1.0 if self.normalize else phi_dim ** -0.5
    o = linear_family.attend(self, q, k, v, decode=decode, normalize=self.normalize, causal=self.causal,
                             prefix_len=prefix_len, block_size=self.block_size, start=pos[0, 0], scale=scale,
                             segment_ids=segment_ids, eps=self.eps, chunk_size=self.chunk_size, impl=self.impl)
    if ok is not None:
      o = poison(o, ok)
    return linear_family.OutputPath(norm=self.output_norm, gate=self.output_gate, norm_eps=self.norm_eps,
                                    name="output", **kw)(o, x)
