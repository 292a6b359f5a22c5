"""LightNet sequence mixer (arXiv 2405.21022).

  q = silu(x W_q), k = x W_k, v = x W_v                        `[B,T,H,K]`, `[B,T,H,K]`, `[B,T,H,V]`
    (short_conv: q = silu(conv(x W_q)), k = conv(x W_k), v = conv(x W_v), depthwise along time, as fla's LightNet)
  o = lightnet(lrpe(q), normalised-k with lrpe, v)            keys softmax-normalised over (past) positions
  y = W_o (rmsnorm(o) * silu(x W_g1 W_g2))                    low-rank output gate

Non-causal inputs may be a token grid `[B,*spatial,d]` (or `[B,T,d]` with `grid_shape`): one pass whatever the
grid's rank, MD-LRPE rotating each part of the key channels by its own grid axis. Causal decode keeps the state
(S, log running sum) and the position in the `cache` collection. Packed 1-D rows (`segment_ids`) need nothing more
than the op's: MD-LRPE depends on position differences only, and no pair crosses a segment.
"""
import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers import ops
from mixers.layers import linear_family
from mixers.layers.common import (Dtype, GatedRMSNorm, check_segment_ids, check_x, constrain, grid_tokens, head_width,
                                  projection)
from mixers.layers.decode_cache import cached_recurrence, check_decode, decode_positions
from mixers.layers.positional import MdLrpe
from mixers.ops import positional
from mixers.registry import register


@register("lightnet")
class LightNet(nn.Module):
  """LightNet mixer: x `[B,T,d]` or `[B,*spatial,d]` -> y of the same shape.

  num_heads: heads H; head_dim: key channels K per head (default d // H); values take d // H per head.
  gate_rank: rank of the output gate. short_conv, conv_width (fla's use_short_conv, conv_size): depthwise convs
  (no activation) on the q, k, v projections before MD-LRPE and the key normalisation, centred when non-causal, 1-D
  inputs only; they restart at segment boundaries and keep their window in the decode cache. use_lrpe / lrpe_base:
  MD-LRPE on q and k (doubles the state's key axis).
  grid_shape: read a `[B,T,d]` input as this grid (non-causal). chunk_size, impl: of the causal core.
  norm_eps: of the gated output norm. dtype: computation (None: promote x and the parameters); param_dtype: the
  parameters'.
  """
  num_heads: int = 8
  head_dim: Optional[int] = None
  causal: bool = True
  gate_rank: int = 32
  short_conv: bool = False
  conv_width: int = 4
  use_lrpe: bool = True
  lrpe_base: float = 10000.0
  grid_shape: Optional[Sequence[int]] = None
  norm_eps: float = 1e-5
  chunk_size: int = 64
  impl: str = "auto"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  aliases = linear_family.FLA_ALIASES

  def _coordinates(self, grid, batch, length, decode):
    """Token coordinates `[B or 1, T, n]` on the n-D grid; 1-D positions continue from the cache when decoding."""
    if len(grid) > 1:
      return positional.grid_positions(grid).reshape(1, length, len(grid))
    return decode_positions(self, batch, length, decode=decode)[..., None]

  def _short_conv(self, a, name, *, grid, mask, decode, segment_ids):
    """a `[B,T,H,D]` through a depthwise conv along time (no activation); a `[B,T,...]` grid is refused."""
    if len(grid) > 1:
      raise ValueError(f"short_conv=True convolves along a 1-D sequence `[B,T,d]`; got a token grid {tuple(grid)}")
    return linear_family.conv_heads(a, name, causal=self.causal, width=self.conv_width, mask=mask, decode=decode,
                                    dtype=self.dtype, param_dtype=self.param_dtype, segment_ids=segment_ids,
                                    activation=None)

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False, segment_ids=None):
    """y of x's shape from x `[B,T,d_model]` or a token grid `[B,*spatial,d_model]` (non-causal).

    mask: `[B,T]` or `[B,*spatial]` bool, True at real tokens (padded tokens add nothing), or None.
    decode: causal only; continue from the `cache` collection (the protocol: `mixers.layers.decode_cache`).
      O(1) state per token.
    segment_ids: `[B,T]` ints (packed 1-D sequences; a segment is a run of equal ids) or None: each segment is
      mixed as its own sequence (short convs restart too); decoding after a packed prompt continues each row's last
      segment.
    """
    check_x(self, x, grid=True)
    check_decode(self, decode)
    xf, grid, mask = grid_tokens(self, x, mask)
    segment_ids = check_segment_ids(self, segment_ids, xf.shape, grid=grid)
    b, t, d = xf.shape
    h = self.num_heads
    dv = head_width(h, None, d)
    dk = self.head_dim or dv
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = projection((h, dk), ("embed", "heads", "kv"), name="q_proj", **kw)(xf)
    k = projection((h, dk), ("embed", "heads", "kv"), name="k_proj", **kw)(xf)
    v = projection((h, dv), ("embed", "heads", "kv"), name="v_proj", **kw)(xf)
    if self.short_conv:
      conv = functools.partial(self._short_conv, grid=grid, mask=mask, decode=decode, segment_ids=segment_ids)
      q, k, v = conv(q, "conv_q"), conv(k, "conv_k"), conv(v, "conv_v")
    q = jax.nn.silu(q)
    phases = MdLrpe(self.lrpe_base).phases(self._coordinates(grid, b, t, decode), dk) if self.use_lrpe else None

    def mix(state):
      kw = dict(mask=mask, phases=phases, chunk_size=self.chunk_size, impl=self.impl, segment_ids=segment_ids)
      if not self.causal and segment_ids is not None:  # one normaliser per segment: no single state to return
        return ops.lightnet(q, k, v, causal=False, **kw), None
      return ops.lightnet(q, k, v, causal=self.causal, initial_state=state, return_state=True, **kw)

    def zero_state():  # (S, log of the running sum), nothing summed yet
      key_dim = dk * (2 if self.use_lrpe else 1)
      return jnp.zeros((b, h, key_dim, dv), jnp.float32), jnp.full((b, h, dk), -jnp.inf, jnp.float32)

    o = cached_recurrence(self, mix, zero_state, decode=decode)
    gate = projection(self.gate_rank, ("embed", "mlp"), name="gate_down", **kw)(xf)
    # The gate scales the heads' outputs, so it carries their axes (heads, kv), not embed.
    gate = projection((h, dv), ("mlp", "heads", "kv"), name="gate_up", **kw)(gate).reshape(b, t, h * dv)
    o = GatedRMSNorm(eps=self.norm_eps, norm_before_gate=True, axis_name="embed", **kw)(o.reshape(b, t, h * dv), gate)
    y = projection(d, ("mlp", "embed"), name="out_proj", **kw)(o)
    return constrain(y).reshape(x.shape)
