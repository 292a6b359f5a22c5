"""HyperAttention layer: softmax attention's projections, rotary positions and KV cache around `ops.hyper_attention`."""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers import ops
from mixers.layers import common
from mixers.layers.decode_cache import cached_recurrence, check_decode, decode_positions, poison, within_capacity
from mixers.layers.rotary import apply_rotary
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
  def __call__(self, x, *, mask=None, decode=False, context=None, context_mask=None):
    """y `[B,T,d_model]` from x `[B,T,d_model]`.

    mask: `[B,T]` bool, True at real tokens (padded keys are never attended to), or None. With a context the keys
      are the context's: context_mask marks them and mask has no effect.
    decode: causal only; continue from the `cache` collection (the protocol: `mixers.layers.decode_cache`).
      x_full's length at init is the KV cache's capacity.
    context: `[B,Tk,d_model]` or None (self attention): cross attention as in `Attention` (non-causal: any Tk, no
      rotary; causal: Tk == T, target t reads sources s <= t). context_mask: `[B,Tk]` bool or None.
    """
    common.check_x(self, x)
    check_decode(self, decode)
    mask = common.check_mask(mask, x.shape)
    source, key_mask = common.check_context(self, x, context, context_mask, mask)
    b, t, d_model = x.shape
    head_dim = common.head_width(self.num_heads, self.head_dim, d_model)
    kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads:
      raise ValueError(f"num_kv_heads={kv_heads} must divide num_heads={self.num_heads}")
    rotary = self.rotary and (context is None or self.causal)
    if rotary and head_dim % 2:
      raise ValueError(f"rotary positions need an even head_dim, got head_dim={head_dim} (d_model={d_model}, "
                       f"num_heads={self.num_heads})")
    proj = lambda heads, name: common.projection((heads, head_dim), ("embed", "heads", "kv"), name=name,
                                                 dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = proj(self.num_heads, "query")(x), proj(kv_heads, "key")(source), proj(kv_heads, "value")(source)
    pos = decode_positions(self, b, t, decode=decode)
    if rotary:
      q, k = apply_rotary(q, pos, self.rotary_base), apply_rotary(k, pos, self.rotary_base)
    what = "the length of the input given to init(..., decode=True)"
    key = self.make_rng("hyper_attention") if self.has_rng("hyper_attention") else jax.random.key(self.seed)

    def attend(kv_cache):
      if kv_cache is None:
        if decode:  # the call that makes the cache records its capacity
          within_capacity(self, t, t, decode=True, what=what)
        o = ops.hyper_attention(q, k, v, causal=self.causal, mask=key_mask, block_size=self.block_size,
                                sample_size=self.sample_size, min_seq_len=self.min_seq_len,
                                lsh_num_projs=self.lsh_num_projs, capacity_factor=self.capacity_factor, key=key)
        return o, None
      ok = within_capacity(self, pos[0, 0] + t, kv_cache[0].shape[1], decode=True, what=what)
      keys, values = (jax.lax.dynamic_update_slice(c, a.astype(c.dtype), (0, pos[0, 0], 0, 0))
                      for c, a in zip(kv_cache, (k, v)))
      visible = jnp.arange(keys.shape[1])[None, None, None, :] <= pos[:, None, :, None]  # [B,1,T,L]
      return poison(ops.attention(q, keys, values, causal=False, mask=visible), ok), (keys, values)

    empty_cache = lambda: (jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))
    o = cached_recurrence(self, attend, empty_cache, decode=decode)
    return common.projection(d_model, ("heads", "kv", "embed"), axis=(-2, -1), name="out", dtype=self.dtype,
                             param_dtype=self.param_dtype)(o)
