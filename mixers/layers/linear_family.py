"""Pieces shared by the layers of the linear-attention family: per-head projections and the output path."""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers import ops
from mixers.layers import common
from mixers.layers.decode_cache import block_aligned, cached_recurrence, poison


FLA_ALIASES = {"use_short_conv": "short_conv", "conv_size": "conv_width"}  # fla's names for the same arguments


def heads_projection(num_heads, head_dim, name, dtype=None, param_dtype=jnp.float32):
  """x `[B,T,d_model]` -> `[B,T,H,D]`, kernel axes (embed, heads, kv)."""
  return common.projection((num_heads, head_dim), ("embed", "heads", "kv"), name=name, dtype=dtype,
                           param_dtype=param_dtype)


def head_widths(d_model, num_heads, expand_k, expand_v):
  """(key, value) width per head: d_model * expand_{k,v} split over num_heads (ValueError unless it divides)."""
  key_total, value_total = int(d_model * expand_k), int(d_model * expand_v)
  if key_total % num_heads or value_total % num_heads:
    raise ValueError(f"num_heads={num_heads} must divide the key width {key_total} and value width {value_total} "
                     f"(d_model={d_model}, expand_k={expand_k}, expand_v={expand_v})")
  return key_total // num_heads, value_total // num_heads


def qkv_projections(x, num_heads, key_dim, value_dim, dtype=None, param_dtype=jnp.float32, context=None):
  """q `[B,T,H,key_dim]` from x `[B,T,d_model]`, k `[B,Tk,H,key_dim]` and v `[B,Tk,H,value_dim]` from `context`
  `[B,Tk,d_model]` (cross attention) or x (kernels query, key, value)."""
  source = x if context is None else context
  q = heads_projection(num_heads, key_dim, "query", dtype, param_dtype)(x)
  k = heads_projection(num_heads, key_dim, "key", dtype, param_dtype)(source)
  return q, k, heads_projection(num_heads, value_dim, "value", dtype, param_dtype)(source)


def conv_heads(x, name, *, causal, width, mask, decode, dtype=None, param_dtype=jnp.float32, segment_ids=None,
               activation=jax.nn.silu):
  """Short depthwise conv over time on a `[B,T,H,D]` tensor (channels = H*D), then `activation` (None: none);
  segment_ids `[B,T]` (packed sequences) or None: no tap reads another segment."""
  b, t, h, d = x.shape
  y = common.ShortConv(width=width, causal=causal, channel_axis="heads", dtype=dtype, param_dtype=param_dtype,
                       name=name, activation=activation)(x.reshape(b, t, h * d), mask=mask, decode=decode,
                                                          segment_ids=segment_ids)
  return y.reshape(b, t, h, d)


_SAME = object()


def short_convs(q, k, v, *, causal, width, mask, decode, dtype=None, param_dtype=jnp.float32, kv_mask=_SAME,
                segment_ids=None):
  """Separate short convs over q, k and v (named conv_q, conv_k, conv_v), as in fla's layers.

  mask `[B,T]` is q's; kv_mask `[B,Tk]` is k's and v's (cross attention: the context's; default: mask). The convs
  run along their own sequence: q's over x, k's and v's over the context. segment_ids `[B,T]` (packed sequences,
  self attention only) or None: no tap reads another segment.
  """
  conv = lambda a, n, m: conv_heads(a, n, causal=causal, width=width, mask=m, decode=decode, dtype=dtype,
                                    param_dtype=param_dtype, segment_ids=segment_ids)
  kv_mask = mask if kv_mask is _SAME else kv_mask
  return conv(q, "conv_q", mask), conv(k, "conv_k", kv_mask), conv(v, "conv_v", kv_mask)


def attend(module, q, k, v, *, causal, decode, normalize=False, prefix_len=None, block_size=None, start=None,
           segment_ids=None, **kwargs):
  """`ops.linear_attention` over q `[B,T,H,K]`, k `[B,Tk,H,K]`, v `[B,Tk,H,V]`; causal layers keep (S[, z]) in the
  cache.

  prefix_len (int or `[B]`, Prefix-LM) and block_size (block-causal) go to the op, causal only. When decoding,
  prefix_len counts from the chunk's first token (the chunk's first prefix_len tokens read each other and the
  cache), and with block_size each chunk must start at a block boundary: `start`, the chunk's first position, is
  checked (`decode_cache.block_aligned`). segment_ids `[B,T]` (packed sequences) or None: each segment is its own
  sequence; decoding, the chunk's first segment continues the cached state and the state kept is the last
  segment's.
  """
  patterns = {} if segment_ids is None else {"segment_ids": segment_ids}
  if prefix_len is not None:
    patterns["prefix_len"] = prefix_len
  if block_size is not None:
    patterns["block_size"] = block_size

  def run(state):
    if not causal:
      return ops.linear_attention(q, k, v, causal=False, normalize=normalize, **patterns, **kwargs), None
    return ops.linear_attention(q, k, v, normalize=normalize, initial_state=state, return_state=True, **patterns,
                                **kwargs)

  def zero_state():
    b, _, h, dk = q.shape
    s = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)
    return (s, jnp.zeros(s.shape[:-1], jnp.float32)) if normalize else s

  ok = block_aligned(module, start, block_size) if decode and block_size is not None else None
  o = cached_recurrence(module, run, zero_state, decode=decode)
  return o if ok is None else poison(o, ok)


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
  norm_eps: float = 1e-6
  dtype: Optional[jnp.dtype] = None
  param_dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, o, x):
    b, t, h, dv = o.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.norm:
      o = common.RMSNorm(self.norm_eps, axis_name="kv", name="head_norm", **kw)(o)
    if self.gate:
      g = common.projection((h, dv), ("embed", "heads", "kv"), name="gate", **kw)(x)
      o = o * jax.nn.silu(g.astype(jnp.float32)).astype(o.dtype)
    return common.projection(x.shape[-1], ("heads", "kv", "embed"), axis=(-2, -1), name="out", **kw)(o)
