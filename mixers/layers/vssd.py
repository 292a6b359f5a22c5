"""VSSD mixer (arXiv 2407.18559): Mamba2 made non-causal (NC-SSD) on a token grid with a depthwise n-D conv.

  [z, xBC, dt] = x W_in;  xBC = silu(dwconv_nd(xBC on the grid));  [x, B, C] = xBC
  dt = clip(softplus(dt + dt_bias), dt_limit);  A = -exp(A_log)
  y = W_out (layernorm(ssd(x, dt, A, B, C, D, causal=False)) * z)
The non-causal SSD is two matmuls (no scan), so the token order of the grid does not matter.
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers import ops
from mixers.layers.common import check_segment_ids, check_x, grid_tokens
from mixers.layers.decode_cache import segment_index
from mixers.layers.ssm_family import SSMLayer
from mixers.registry import register


def depthwise_conv_init():
  """uniform(+-1/sqrt(fan_in)) with fan_in the window size, the usual default for depthwise convs."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@register("vssd")
class VSSD(SSMLayer):
  """VSSD mixer: x `[B,T,d]` (a sequence, or a grid given by `grid_shape`) or `[B,*spatial,d]` -> same shape.

  Fields in `SSMLayer`; conv_width: the window of the depthwise conv along each grid axis (centred).
  """
  state_dim: int = 64
  conv_width: int = 3
  causal: bool = False
  grid_shape: Optional[Sequence[int]] = None

  supports_causal = False

  @nn.compact
  def operands(self, x, *, mask=None, decode=False, segment_ids=None):
    """The non-causal SSD's operands on the flattened grid: (dict x `[B,T,H,P]`, dt, A, B, C, D; gate z);
    segment_ids `[B,T]` or None (a 1-D sequence only): the conv stays within each segment."""
    check_x(self, x, grid=True)
    self.check_modes(decode)
    xf, grid, mask = grid_tokens(self, x, mask)
    segment_ids = check_segment_ids(self, segment_ids, xf.shape, grid=grid)
    return self.ssd_operands(xf, mask, grid=grid, segment_ids=segment_ids)

  def mixing_matrix(self, x, *, mask=None, segment_ids=None):
    """The non-causal SSD's mixing matrix `[B,H,T,T]` over the flattened grid (D on the diagonal)."""
    o, _ = self.operands(x, mask=mask, segment_ids=segment_ids)
    return ops.ssd_matrix(o["dt"], o["A"], o["B"], o["C"], D=o["D"], causal=False, segment_ids=segment_ids)

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False, segment_ids=None):
    """y of x's shape from x `[B,T,d_model]` or a token grid `[B,*spatial,d_model]` (bidirectional).

    mask: `[B,T]` or `[B,*spatial]` bool, True at real tokens (padded tokens leak into no real token), or None.
    decode: must be False (VSSD is non-causal).
    segment_ids: `[B,T]` ints or None (packed sequences; a segment is a run of equal ids; a 1-D sequence only):
      each segment is mixed as its own sequence (the conv and the SSD stay within it).
    """
    operands, z = self.operands(x, mask=mask, decode=decode, segment_ids=segment_ids)
    packed = {} if segment_ids is None else {"segment_ids": jnp.asarray(segment_ids)}
    y = ops.ssd(**operands, causal=False, chunk_size=self.chunk_size, impl=self.impl, **packed)
    return self.output(y, z, x.shape[-1]).reshape(x.shape)

  def short_conv(self, xbc, *, mask, decode, grid, segment_ids=None):
    """silu(depthwise conv on the token grid) of xBC `[B,T,C]`, centred along every grid axis; on a 1-D sequence,
    within each segment of `segment_ids` `[B,T]` (or None)."""
    del decode  # a non-causal VSSD never decodes (check_modes)
    if mask is not None:
      xbc = jnp.where(mask[..., None], xbc, 0)
    b, t, channels = xbc.shape
    conv = nn.Conv(channels, (self.conv_width,) * len(grid), padding="SAME", feature_group_count=channels,
                   use_bias=self.conv_bias, dtype=self.dtype, param_dtype=self.param_dtype, name="conv",
                   kernel_init=nn.with_logical_partitioning(depthwise_conv_init(),
                                                            ("conv",) + (None,) * len(grid) + ("mlp",)),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))
    if segment_ids is None:
      return jax.nn.silu(conv(xbc.reshape(b, *grid, channels)).reshape(b, t, channels))
    # packed: each token's window (taps in other segments zeroed) through the same conv, read at the window's centre
    w = self.conv_width
    lo, hi = (w - 1) // 2, w - 1 - (w - 1) // 2
    seg = segment_index(segment_ids)
    xp = jnp.pad(xbc, ((0, 0), (lo, hi), (0, 0)))
    segp = jnp.pad(seg, ((0, 0), (lo, hi)), constant_values=-1)
    windows = jnp.stack([xp[:, j:j + t] * (segp[:, j:j + t] == seg)[..., None].astype(xp.dtype) for j in range(w)],
                        axis=2)  # [B,T,w,C]
    y = conv(windows.reshape(b * t, w, channels))[:, lo]
    return jax.nn.silu(y.reshape(b, t, channels))

  def gate(self, y, z):
    """layernorm(y) * z."""
    y = nn.LayerNorm(epsilon=self.norm_eps, dtype=jnp.float32, param_dtype=self.param_dtype, name="norm",
                     scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(y)
    return (y * z.astype(jnp.float32)).astype(z.dtype if self.dtype is None else self.dtype)
