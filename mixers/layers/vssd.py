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

from mixers.layers.common import constrain, projection
from mixers.layers.mamba2 import SSMParams, head_layout
from mixers.layers.positional import token_grid
from mixers.ops.ssd import ssd, ssd_matrix
from mixers.registry import register


def depthwise_conv_init():
  """uniform(+-1/sqrt(fan_in)) with fan_in the window size, the usual default for depthwise convs."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@register("vssd")
class VSSD(nn.Module):
  """VSSD mixer: x `[B,T,d]` (a sequence, or a grid given by `grid_shape`) or `[B,*spatial,d]` -> same shape.

  expand, head_dim / num_heads, state_dim, num_groups, dt_*, a_init_range: as in Mamba2; conv_width: the
  window of the depthwise conv along each grid axis (centred).
  """
  expand: float = 2
  head_dim: int = 64
  num_heads: Optional[int] = None
  state_dim: int = 64
  num_groups: int = 1
  conv_width: int = 3
  causal: bool = False
  grid_shape: Optional[Sequence[int]] = None
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  dt_limit: Sequence[float] = (0.0, float("inf"))
  a_init_range: Sequence[float] = (1.0, 16.0)
  use_bias: bool = False
  conv_bias: bool = True
  norm_eps: float = 1e-5
  dtype: Optional[jnp.dtype] = None

  supports_causal = False

  def __call__(self, x, *, mask=None, decode=False):
    if decode:
      raise ValueError("VSSD is non-causal and cannot decode (decode=True)")
    return self._run(x, mask, "output")

  def mixing_matrix(self, x, *, mask=None):
    """The non-causal SSD's mixing matrix `[B,H,T,T]` over the flattened grid (D on the diagonal)."""
    return self._run(x, mask, "matrix")

  def ssm_inputs(self, x, *, mask=None):
    """dict of z, x `[B,T,H,P]`, dt, A, B, C, D on the flattened grid."""
    return self._run(x, mask, "inputs")

  @nn.compact
  def _run(self, x, mask, what):
    if self.causal:
      raise ValueError("VSSD is non-causal: causal must be False")
    shape = x.shape
    xf, grid = token_grid(x, self.grid_shape)
    b, t, d = xf.shape
    inner, h, p = head_layout(d, self.expand, self.head_dim, self.num_heads, self.num_groups, shape)
    g, n = self.num_groups, self.state_dim
    if mask is not None:
      if mask.shape not in (tuple(shape[:-1]), (b, t)):
        raise ValueError(f"mask must have shape {tuple(shape[:-1])} or [B,T] = {(b, t)}, got {tuple(mask.shape)}")
      mask = mask.reshape(b, t).astype(bool)
    zxbcdt = projection(2 * inner + 2 * g * n + h, ("embed", "mlp"), use_bias=self.use_bias, name="in_proj",
                        dtype=self.dtype)(xf)
    z, xbc, dt_raw = jnp.split(zxbcdt, [inner, 2 * inner + 2 * g * n], axis=-1)
    if mask is not None:
      xbc = jnp.where(mask[..., None], xbc, 0)
    channels = xbc.shape[-1]
    conv = nn.Conv(channels, (self.conv_width,) * len(grid), padding="SAME", feature_group_count=channels,
                   use_bias=self.conv_bias, dtype=self.dtype, name="conv",
                   kernel_init=nn.with_logical_partitioning(depthwise_conv_init(),
                                                            ("conv",) + (None,) * len(grid) + ("mlp",)),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))
    xbc = jax.nn.silu(conv(xbc.reshape(b, *grid, channels)).reshape(b, t, channels))
    xs, bs, cs = jnp.split(xbc, [inner, inner + g * n], axis=-1)
    dt, a, d_skip = SSMParams(h, self.dt_min, self.dt_max, self.dt_init_floor, self.dt_limit, self.a_init_range,
                              name="ssm")(dt_raw, mask)
    ops = dict(z=z, x=xs.reshape(b, t, h, p), dt=dt, A=a, B=bs.reshape(b, t, g, n), C=cs.reshape(b, t, g, n),
               D=d_skip)
    if what == "inputs":
      return ops
    if what == "matrix":
      return ssd_matrix(dt, a, ops["B"], ops["C"], D=d_skip, causal=False)
    y = ssd(ops["x"], dt, a, ops["B"], ops["C"], D=d_skip, causal=False).reshape(b, t, inner)
    y = nn.LayerNorm(epsilon=self.norm_eps, dtype=jnp.float32, name="norm",
                     scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(y)
    y = (y * z.astype(jnp.float32)).astype(z.dtype)
    y = projection(d, ("mlp", "embed"), use_bias=self.use_bias, name="out_proj", dtype=self.dtype)(y)
    return constrain(y).reshape(shape)
