"""HyperAttention layer: softmax attention's projections, rotary positions and KV cache around `ops.hyper_attention`."""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers import ops
from mixers.layers import common
from mixers.layers.attention import attend_through_cache, project_heads
from mixers.layers.decode_cache import check_decode, segment_positions
from mixers.registry import register


@register("hyper_attention")
class HyperAttention(nn.Module):
  """o ~ softmax(q k^T / sqrt(D)) v per head by HyperAttention (near-linear time), then an output projection.
  x `[B,T,d_model]`.

  num_heads / head_dim / num_kv_heads / rotary / rotary_base: as `Attention`. block_size, sample_size, min_seq_len,
  lsh_num_projs, capacity_factor: `ops.hyper_attention`'s (sequences of at most min_seq_len tokens get exact
  attention). Randomness (hash projections, sampled keys): drawn from the "hyper_attention" rng stream when the call
  provides one (`apply(..., rngs={"hyper_attention": key})`, fresh per training step), else from
  jax.random.key(seed), the same on every call. dtype / param_dtype: computation and parameter dtypes.

  Decoding keeps keys and values for as many positions as the input given to `init(..., decode=True)` and attends
  exactly over the cache: a prompt or a token reads every cached position, as `Attention` does (the approximation
  pays off in training and in the prefill of a long input, which runs without a cache). So decoding equals the
  forward only where the forward is exact (T <= min_seq_len, or block_size or sample_size covering the keys).

  Packed sequences (`segment_ids`): no query attends to a key of another segment (exact path, LSH blocks and sampled
  columns alike) and rotary positions count from each segment's first token; where the forward is exact each segment
  equals that segment run alone, elsewhere it is an estimate from its own segment's keys. Decoding keeps each row's
  last-segment start, as `Attention` does.
  """
  num_heads: int = 4
  head_dim: Optional[int] = None
  num_kv_heads: Optional[int] = None
  causal: bool = True
  rotary: bool = True
  rotary_base: float = 10000.0
  block_size: int = 256
  sample_size: int = 256
  min_seq_len: int = 4096
  lsh_num_projs: int = 7
  capacity_factor: float = 2.0
  seed: int = 0
  dtype: Optional[common.Dtype] = None
  param_dtype: common.Dtype = jnp.float32

  aliases = {"rope_theta": "rotary_base"}

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False, context=None, context_mask=None, segment_ids=None):
    """y `[B,T,d_model]` from x `[B,T,d_model]`.

    mask: `[B,T]` bool, True at real tokens (padded keys are never attended to), or None. With a context the keys
      are the context's: context_mask marks them and mask has no effect.
    decode: causal only; continue from the `cache` collection (the protocol: `mixers.layers.decode_cache`).
      x_full's length at init is the KV cache's capacity.
    context: `[B,Tk,d_model]` or None (self attention): cross attention as in `Attention` (non-causal: any Tk, no
      rotary; causal: Tk == T, target t reads sources s <= t). context_mask: `[B,Tk]` bool or None.
    segment_ids: `[B,T]` ints or None (packed sequences; a segment is a run of equal ids): a token attends only
      within its segment (in every part of the estimate), and rotary positions count from the segment's first
      token. Decoding, the chunk's first segment continues the cache and later chunks read only the row's last
      segment. Not with a context.
    """
    common.check_x(self, x)
    check_decode(self, decode)
    mask = common.check_mask(mask, x.shape)
    segment_ids = common.check_segment_ids(self, segment_ids, x.shape, context=context)
    source, key_mask = common.check_context(self, x, context, context_mask, mask)
    pos, first = segment_positions(self, segment_ids, x.shape[0], x.shape[1], decode=decode)
    q, k, v, pos = project_heads(self, x, source, context=context, decode=decode, positions=(pos, pos - first))
    key = self.make_rng("hyper_attention") if self.has_rng("hyper_attention") else jax.random.key(self.seed)
    forward = lambda: ops.hyper_attention(q, k, v, causal=self.causal, mask=key_mask, block_size=self.block_size,
                                          sample_size=self.sample_size, min_seq_len=self.min_seq_len,
                                          lsh_num_projs=self.lsh_num_projs, capacity_factor=self.capacity_factor,
                                          key=key, segment_ids=segment_ids)
    o = attend_through_cache(self, q, k, v, pos, forward, decode=decode, first_visible=first)
    return common.projection(x.shape[-1], ("heads", "kv", "embed"), axis=(-2, -1), name="out", dtype=self.dtype,
                             param_dtype=self.param_dtype)(o)
