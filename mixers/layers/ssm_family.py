"""What the SSM layers (Mamba2, Hydra, VSSD) share: their fields, SSM parameters, projections, short conv and output.

  [z, xBC, dt] = x W_in;  xBC = silu(conv(xBC));  [x, (B, C) per direction] = xBC
  dt = clip(softplus(dt + dt_bias), dt_limit);  A = -exp(A_log)
  y = W_out gate(op(x, dt, A, B, C, D), z)
Each layer's `operands(x)` returns the op's inputs; its `mixing_matrix(x)` is the op's matrix form on the same
operands, and its `__call__` the op itself followed by `output`.
"""
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers.layers.common import Dtype, ShortConv, check_x, constrain, projection, torch_conv_init
from mixers.layers.decode_cache import check_decode


def dt_bias_init(dt_min, dt_max, dt_init_floor):
  """dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] and at least dt_init_floor."""
  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, dt_init_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
  return init


def a_log_init(low, high):
  """A_log = log(A), A uniform in [low, high] (low = high gives a constant)."""
  if not 0 < low <= high:
    raise ValueError(f"a_init_range must satisfy 0 < low <= high, got ({low}, {high})")

  def init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high)).astype(dtype)
  return init


def head_layout(width, expand, head_dim, num_heads, num_groups, x_shape):
  """(inner width, heads, head dim) for a layer of `expand * width` channels; ValueError if they do not divide."""
  inner = int(expand * width)
  if num_heads is not None:
    if num_heads <= 0 or inner % num_heads:
      raise ValueError(f"num_heads={num_heads} must divide the inner width expand*d = {inner} (x {tuple(x_shape)})")
    head_dim = inner // num_heads
  if head_dim <= 0 or inner % head_dim:
    raise ValueError(f"head_dim={head_dim} must divide the inner width expand*d = {inner} (x {tuple(x_shape)})")
  heads = inner // head_dim
  if num_groups <= 0 or heads % num_groups:
    raise ValueError(f"num_groups={num_groups} must divide the head count {heads} (x {tuple(x_shape)})")
  return inner, heads, head_dim


class SSMParams(nn.Module):
  """dt_bias, A_log and D `[H]` of one SSM, and the step sizes dt = clip(softplus(dt_raw + dt_bias), dt_limit)."""
  num_heads: int
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  dt_limit: Sequence[float] = (0.0, float("inf"))
  a_init_range: Sequence[float] = (1.0, 16.0)
  param_dtype: Dtype = jnp.float32

  def setup(self):
    heads = lambda init: nn.with_logical_partitioning(init, ("heads",))
    self.dt_bias = self.param("dt_bias", heads(dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor)),
                              (self.num_heads,), self.param_dtype)
    self.A_log = self.param("A_log", heads(a_log_init(*self.a_init_range)), (self.num_heads,), self.param_dtype)
    self.D = self.param("D", heads(nn.initializers.ones), (self.num_heads,), self.param_dtype)

  def A(self):
    """A = -exp(A_log) `[H]`, float32."""
    return -jnp.exp(self.A_log.astype(jnp.float32))

  def steps(self, dt_raw, mask=None):
    """dt `[B,T,H]` in float32; zero where mask is False (padded tokens neither write nor decay)."""
    dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + self.dt_bias.astype(jnp.float32))
    lo, hi = self.dt_limit
    if lo > 0 or hi < float("inf"):
      dt = jnp.clip(dt, lo, hi)
    return dt if mask is None else jnp.where(mask[..., None], dt, 0.0)

  def __call__(self, dt_raw, mask=None):
    """(dt `[B,T,H]`, A `[H]`, D `[H]`), float32."""
    return self.steps(dt_raw, mask), self.A(), self.D.astype(jnp.float32)


class SSMLayer(nn.Module):
  """Fields and pieces of an SSM mixer; a layer adds `operands` (its op's inputs), `__call__`, `mixing_matrix`, `gate`.

  expand: inner width expand * d; head_dim P (or num_heads, which sets P = inner // num_heads); state_dim N;
  num_groups G of shared B, C (G divides H); conv_width: the depthwise conv's window; dt_min / dt_max /
  dt_init_floor: dt initialisation; dt_limit: clamp of dt; a_init_range: A = -uniform(range) at init;
  use_bias: of the in and out projections; conv_bias: of the conv; norm_eps: of the output norm; chunk_size,
  impl: of the op. dtype: computation (None: promote x and the parameters); param_dtype: the parameters'.
  Aliases (mamba_ssm's names): d_state, d_conv, headdim, ngroups, A_init_range, bias.

  `operands` and `__call__` are both `nn.compact`: each creates its own (explicitly named) submodules, so
  `apply(..., method="operands")` and `method="mixing_matrix"` run without the output path.
  """
  expand: float = 2
  head_dim: int = 64
  num_heads: Optional[int] = None
  state_dim: int = 128
  num_groups: int = 1
  conv_width: int = 4
  causal: bool = True
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  dt_limit: Sequence[float] = (0.0, float("inf"))
  a_init_range: Sequence[float] = (1.0, 16.0)
  use_bias: bool = False
  conv_bias: bool = True
  norm_eps: float = 1e-5
  chunk_size: int = 64
  impl: str = "auto"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  supports_causal = True
  aliases = {"d_state": "state_dim", "d_conv": "conv_width", "headdim": "head_dim", "ngroups": "num_groups",
             "A_init_range": "a_init_range", "bias": "use_bias"}

  def kw(self):
    """The dtype arguments every submodule takes."""
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  def check_modes(self, decode):
    """ValueError for causal=True on a bidirectional layer, or decode=True on a non-causal one."""
    if self.causal and not self.supports_causal:
      raise ValueError(f"{type(self).__name__} is non-causal: causal must be False")
    check_decode(self, decode)

  def project(self, x, mask, *, decode=False, grid=None, directions=1, segment_ids=None):
    """x `[B,T,d]` -> z `[B,T,inner]`, x `[B,T,H,P]` and per direction (B `[B,T,G,N]`, C `[B,T,G,N]`, raw dt `[B,T,H]`).

    [z, xBC, dt] = x W_in;  xBC = conv(xBC) (`self.short_conv` on the token `grid`);  [x, (B, C) per direction] = xBC.
    segment_ids `[B,T]` (packed sequences) or None: the conv reads no token of another segment.
    """
    check_x(self, x)
    b, t, d = x.shape
    inner, h, p = head_layout(d, self.expand, self.head_dim, self.num_heads, self.num_groups, x.shape)
    gn = self.num_groups * self.state_dim
    zxbcdt = projection(2 * inner + 2 * directions * gn + directions * h, ("embed", "mlp"), use_bias=self.use_bias,
                        name="in_proj", **self.kw())(x)
    z, xbc, dt_raw = jnp.split(zxbcdt, [inner, 2 * inner + 2 * directions * gn], axis=-1)
    xbc = self.short_conv(xbc, mask=mask, decode=decode, grid=grid or (t,), segment_ids=segment_ids)
    xs, *bc = jnp.split(xbc, [inner + i * gn for i in range(2 * directions)], axis=-1)
    groups = lambda a: a.reshape(b, t, self.num_groups, self.state_dim)
    dts = jnp.split(dt_raw, directions, axis=-1)
    return z, xs.reshape(b, t, h, p), [(groups(bc[2 * i]), groups(bc[2 * i + 1]), dts[i]) for i in range(directions)]

  def short_conv(self, xbc, *, mask, decode, grid, segment_ids=None):
    """silu(depthwise conv over time) of xBC `[B,T,C]`, causal or centred, within each segment of `segment_ids`
    `[B,T]` (or None); a 1-D `grid` only."""
    if len(grid) != 1:
      raise ValueError(f"{type(self).__name__} reads a 1-D sequence, got grid {grid}")
    return ShortConv(self.conv_width, causal=self.causal, use_bias=self.conv_bias, channel_axis="mlp",
                     kernel_init=torch_conv_init(self.conv_width), bias_init=torch_conv_init(self.conv_width),
                     name="conv", **self.kw())(xbc, mask=mask, decode=decode, segment_ids=segment_ids)

  def ssm_params(self, num_heads):
    """The SSM's parameters (dt_bias, A_log, D), submodule `ssm`."""
    return SSMParams(num_heads, self.dt_min, self.dt_max, self.dt_init_floor, self.dt_limit, self.a_init_range,
                     param_dtype=self.param_dtype, name="ssm")

  def ssd_operands(self, x, mask, *, decode=False, grid=None, segment_ids=None):
    """(x, dt, A, B, C, D of `ops.ssd` as a dict, gate z) for x `[B,T,d]` (one direction); segment_ids `[B,T]` or
    None reach the conv."""
    z, xs, [(bs, cs, dt_raw)] = self.project(x, mask, decode=decode, grid=grid, segment_ids=segment_ids)
    dt, a, d_skip = self.ssm_params(xs.shape[2])(dt_raw, mask)
    return dict(x=xs, dt=dt, A=a, B=bs, C=cs, D=d_skip), z

  def output(self, y, z, width):
    """y `[B,T,H,P]`, gate z `[B,T,inner]` -> W_out gate(y, z) `[B,T,width]`."""
    y = self.gate(y.reshape(*y.shape[:2], -1), z)
    return constrain(projection(width, ("mlp", "embed"), use_bias=self.use_bias, name="out_proj", **self.kw())(y))
