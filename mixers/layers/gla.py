"""Gated linear attention (GLA): data-dependent decays per key channel."""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers.layers import common, linear_family
from mixers.layers.decode_cache import check_decode, decode_positions
from mixers.registry import register


@register("gla")
class GLA(nn.Module):
  """S_t = diag(a_t) S_{t-1} + k_t v_t^T, o_t = q_t^T S_t / sqrt(Dk), log a_t = logsigmoid(x W1 W2 + b) / tau.

  The gate is low-rank (W1: d_model x gate_rank) and divided by tau = gate_logit_normalizer (GLA's 16), so
  decays start close to 1. Per-head RMSNorm (norm_eps) and a swish output gate; non-causal runs the gates both
  ways. Key / value widths are expand_k * d_model and expand_v * d_model over num_heads heads. block_size (causal
  only): block-causal, a token reads its whole block and every earlier block (weights decayed as non-causal within
  a block); decoding, each chunk starts at a block boundary; short convs stay causal. dtype: computation
  (None: promote x and the parameters); param_dtype: the parameters'.
  """
  num_heads: int = 4
  expand_k: float = 0.5
  expand_v: float = 1.0
  gate_rank: int = 16
  gate_logit_normalizer: float = 16.0
  short_conv: bool = False
  conv_width: int = 4
  norm_eps: float = 1e-6
  causal: bool = True
  block_size: Optional[int] = None
  chunk_size: int = 64
  impl: str = "auto"
  dtype: Optional[common.Dtype] = None
  param_dtype: common.Dtype = jnp.float32

  aliases = {**linear_family.FLA_ALIASES, "gate_low_rank_dim": "gate_rank"}

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False, prefix_len=None, context=None, context_mask=None,
               segment_ids=None):
    """y `[B,T,d_model]` from x `[B,T,d_model]`.

    mask: `[B,T]` bool, True at real tokens (padded tokens neither write nor decay the state), or None.
    decode: causal only; continue from the `cache` collection (the protocol: `mixers.layers.decode_cache`).
      O(1) state per token.
    prefix_len: None, int or `[B]` ints, causal only (Prefix-LM, as in `LinearAttention`): within the prefix the
      weights are the non-causal ones (decays over the tokens between t and s); short convs stay causal.
    context: `[B,Tk,d_model]` or None: cross attention, q from x; k, v and the decays from the context (the decays
      belong to the key channels); the output gate from x. The decays pair target t with source t, so Tk == T
      (causal: target t reads sources s <= t; non-causal: the decayed weights across both directions).
      context_mask: `[B,Tk]` bool, True at real context tokens.
    segment_ids: `[B,T]` ints or None (packed sequences; a segment is a run of equal ids): each segment is mixed as
      its own sequence (state and short convs restart); decoding, the chunk's first segment continues the cache
      and later chunks continue the last segment. Not with prefix_len, block_size or context.
    """
    common.check_x(self, x)
    common.check_cross_decode(self, decode, context)
    check_decode(self, decode)
    common.check_patterns(self, prefix_len=prefix_len, block_size=self.block_size)
    mask = common.check_mask(mask, x.shape)
    segment_ids = common.check_segment_ids(self, segment_ids, x.shape, prefix_len=prefix_len,
                                           block_size=self.block_size, context=context)
    source, source_mask = common.check_context(self, x, context, context_mask, mask, aligned=True)
    dk, dv = linear_family.head_widths(x.shape[-1], self.num_heads, self.expand_k, self.expand_v)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = linear_family.qkv_projections(x, self.num_heads, dk, dv, context=context, **kw)
    if self.short_conv:
      q, k, v = linear_family.short_convs(q, k, v, causal=self.causal, width=self.conv_width, mask=mask,
                                          kv_mask=source_mask, decode=decode, segment_ids=segment_ids, **kw)
    low = common.projection(self.gate_rank, ("embed", None), name="gate_down", **kw)(source)
    logits = common.projection((self.num_heads, dk), (None, "heads", "kv"), use_bias=True, name="gate_up", **kw)(low)
    log_decay = jax.nn.log_sigmoid(logits.astype(jnp.float32)) / self.gate_logit_normalizer
    k, v, log_decay = linear_family.mask_tokens(source_mask, k, v, log_decay)
    start = None
    if self.block_size is not None:  # decoding checks that each chunk starts a block
      start = decode_positions(self, x.shape[0], x.shape[1], decode=decode)[0, 0]
    o = linear_family.attend(self, q, k, v, decode=decode, causal=self.causal, log_decay=log_decay,
                             prefix_len=prefix_len, block_size=self.block_size, start=start,
                             segment_ids=segment_ids, chunk_size=self.chunk_size, impl=self.impl)
    return linear_family.OutputPath(norm=True, gate=True, norm_eps=self.norm_eps, name="output", **kw)(o, x)
