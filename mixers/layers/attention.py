"""Softmax attention layer (the baseline): multi-head or grouped-query, rotary positions, KV cache."""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers import ops
from mixers.layers import common
from mixers.layers.decode_cache import (block_aligned, cached_recurrence, check_decode, decode_positions, poison,
                                       segment_positions, within_capacity)
from mixers.layers.rotary import apply_rotary
from mixers.registry import register


@register("attention")
class Attention(nn.Module):
  """o = softmax(q k^T / sqrt(D)) v per head, then an output projection. x `[B,T,d_model]`.

  num_heads / head_dim (default d_model // num_heads) / num_kv_heads (grouped-query; divides num_heads);
  rotary, rotary_base: rotary positions on q and k. block_size (causal only): block-causal, a token reads its whole
  block of block_size tokens and every earlier block; decoding, each chunk starts at a block boundary
  (`decode_cache.block_aligned`). dtype: computation (None: promote x and the parameters);
  param_dtype: the parameters'. Decoding keeps keys and values for as many positions as the input given to
  `init(..., decode=True)` (its capacity; decoding past it raises, or gives NaN under jit).
  """
  num_heads: int = 4
  head_dim: Optional[int] = None
  num_kv_heads: Optional[int] = None
  causal: bool = True
  block_size: Optional[int] = None
  rotary: bool = True
  rotary_base: float = 10000.0
  dtype: Optional[common.Dtype] = None
  param_dtype: common.Dtype = jnp.float32

  aliases = {"rope_theta": "rotary_base"}

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False, prefix_len=None, context=None, context_mask=None,
               segment_ids=None):
    """y `[B,T,d_model]` from x `[B,T,d_model]`.

    mask: `[B,T]` bool, True at real tokens (padded keys are never attended to), or None. With a context the keys
      are the context's: context_mask marks them and mask has no effect.
    decode: causal only; continue from the `cache` collection (the protocol: `mixers.layers.decode_cache`).
      x_full's length at init is the KV cache's capacity.
    prefix_len: None, int or `[B]` ints, causal only (Prefix-LM): the first prefix_len tokens read each other, later
      tokens everything before them. Decoding, it counts from the chunk's first token (the chunk's first prefix_len
      tokens read each other and the cache): a prompt read with it fills the cache, later chunks go on causally.
    context: `[B,Tk,d_model]` or None (self attention): cross attention, q from x, k and v from the context through
      the same projections. Non-causal: any Tk, and no rotary (the positions of two sequences are not comparable).
      Causal (target t reads sources s <= t): Tk == T, rotary at the shared positions, and decoding takes the
      context chunk that matches each x chunk into the KV cache. Non-causal cross attention has no decode mode
      (ValueError): target t reads only x_t and the whole context, so calling the layer on each new x chunk with the
      whole context gives the full forward's outputs. context_mask: `[B,Tk]` bool, True at real context tokens.
    segment_ids: `[B,T]` ints or None (packed sequences; a segment is a run of equal ids): a token attends only
      within its segment, and rotary positions count from the segment's first token. Decoding, the chunk's first
      segment continues the cache; the cache keeps each row's last-segment start, so later chunks read only that
      segment's keys. Not with prefix_len, block_size or context.
    """
    common.check_x(self, x)
    common.check_cross_decode(self, decode, context)
    check_decode(self, decode)
    common.check_patterns(self, prefix_len=prefix_len, block_size=self.block_size)
    mask = common.check_mask(mask, x.shape)
    segment_ids = common.check_segment_ids(self, segment_ids, x.shape, prefix_len=prefix_len,
                                           block_size=self.block_size, context=context)
    source, key_mask = common.check_context(self, x, context, context_mask, mask)
    pos, first = segment_positions(self, segment_ids, x.shape[0], x.shape[1], decode=decode)
    q, k, v, pos = project_heads(self, x, source, context=context, decode=decode, positions=(pos, pos - first))
    patterns = {key: val for key, val in (("prefix_len", prefix_len), ("block_size", self.block_size),
                                          ("segment_ids", segment_ids)) if val is not None}
    aligned = None if self.block_size is None else (lambda start: block_aligned(self, start, self.block_size))
    o = attend_through_cache(self, q, k, v, pos,
                             lambda: ops.attention(q, k, v, causal=self.causal, mask=key_mask, **patterns),
                             decode=decode, last_visible=lambda pos: self._last_visible(pos, x.shape[1], prefix_len),
                             aligned=aligned, first_visible=first)
    return common.projection(x.shape[-1], ("heads", "kv", "embed"), axis=(-2, -1), name="out", dtype=self.dtype,
                             param_dtype=self.param_dtype)(o)

  def _last_visible(self, pos, t, prefix_len):
    """`[B,T]`: the last cache position each query of a decode chunk (positions `pos` `[B,T]`) reads."""
    start = pos[:, :1]
    if self.block_size is not None:  # its block, up to the chunk's last token
      return jnp.minimum((pos // self.block_size + 1) * self.block_size, start + t) - 1
    if prefix_len is None:
      return pos
    p = common.prefix_lengths(prefix_len, pos.shape[0], t)[:, None]
    return jnp.where(pos - start < p, start + p - 1, pos)


def project_heads(module, x, source, *, context, decode, positions=None):
  """(q `[B,T,H,D]` from x, k and v `[B,Tk,Hkv,D]` from `source`, positions `[B,T]`) through the projections named
  query, key and value, with rotary positions on q and k for self and causal cross attention (non-causal cross
  attention has none: the positions of two sequences are not comparable). Reads the module's num_heads, head_dim,
  num_kv_heads, causal, rotary, rotary_base, dtype and param_dtype. positions: None (`decode_positions`) or the pair
  (positions `[B,T]` returned, positions `[B,T]` that rotary reads)."""
  b, t, d_model = x.shape
  head_dim = common.head_width(module.num_heads, module.head_dim, d_model)
  kv_heads = module.num_kv_heads or module.num_heads
  if module.num_heads % kv_heads:
    raise ValueError(f"num_kv_heads={kv_heads} must divide num_heads={module.num_heads}")
  rotary = module.rotary and (context is None or module.causal)
  if rotary and head_dim % 2:
    raise ValueError(f"rotary positions need an even head_dim, got head_dim={head_dim} (d_model={d_model}, "
                     f"num_heads={module.num_heads})")
  proj = lambda heads, name: common.projection((heads, head_dim), ("embed", "heads", "kv"), name=name,
                                               dtype=module.dtype, param_dtype=module.param_dtype)
  q, k, v = proj(module.num_heads, "query")(x), proj(kv_heads, "key")(source), proj(kv_heads, "value")(source)
  pos, rotary_pos = (decode_positions(module, b, t, decode=decode),) * 2 if positions is None else positions
  if rotary:
    q, k = apply_rotary(q, rotary_pos, module.rotary_base), apply_rotary(k, rotary_pos, module.rotary_base)
  return q, k, v, pos


def attend_through_cache(module, q, k, v, pos, forward, *, decode, last_visible=None, aligned=None,
                         first_visible=None):
  """o `[B,T,H,Dv]`: `forward()` when there is no cache to read; decoding, k and v are written into the KV cache at
  positions `pos` `[B,T]` and q attends exactly over it, each query up to `last_visible(pos)` `[B,T]` (default: its
  own position) and from `first_visible` `[B,T]` (default: 0; packed sequences: its segment's first position).
  The cache's capacity is the length given to `init(..., decode=True)`; past it, or where `aligned(start)` is
  False, the output is NaN (a concrete violation raises)."""
  t = q.shape[1]
  what = "the length of the input given to init(..., decode=True)"

  def attend(kv_cache):
    if kv_cache is None:
      if decode:  # the call that makes the cache records its capacity
        within_capacity(module, t, t, decode=True, what=what)
      return forward(), None
    start = pos[0, 0]
    ok = within_capacity(module, start + t, kv_cache[0].shape[1], decode=True, what=what)
    if aligned is not None:
      ok = ok & aligned(start)
    keys, values = (jax.lax.dynamic_update_slice(c, a.astype(c.dtype), (0, start, 0, 0))
                    for c, a in zip(kv_cache, (k, v)))
    last = pos if last_visible is None else last_visible(pos)
    visible = jnp.arange(keys.shape[1])[None, None, None, :] <= last[:, None, :, None]  # [B,1,T,L]
    if first_visible is not None:
      visible = visible & (jnp.arange(keys.shape[1])[None, None, None, :] >= first_visible[:, None, :, None])
    return poison(ops.attention(q, keys, values, causal=False, mask=visible), ok), (keys, values)

  empty_cache = lambda: (jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))
  return cached_recurrence(module, attend, empty_cache, decode=decode)
