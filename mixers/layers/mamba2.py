"""Mamba2 sequence mixer (arXiv 2405.21060) and the SSM parameters it shares with Hydra and VSSD.

  [z, xBC, dt] = x W_in;  xBC = silu(conv1d(xBC));  [x, B, C] = xBC
  dt = clip(softplus(dt + dt_bias), dt_limit);  A = -exp(A_log)
  y = W_out gated_rmsnorm(ssd(x, dt, A, B, C, D), z)
Decode keeps the conv window and the SSM state `[B,H,P,N]` in the `cache` collection; any chunk length
continues from them, so decoding token by token reproduces the full forward.
"""
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers.layers.common import torch_conv_init, GatedRMSNorm, ShortConv, constrain, decode_cache, projection
from mixers.ops.ssd import ssd, ssd_matrix
from mixers.registry import register
from mixers.sharding import maybe_sequence_parallel


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


def check_mask(mask, x):
  if mask is None:
    return None
  if mask.shape != x.shape[:2]:
    raise ValueError(f"mask must have shape [B,T] = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
  return mask.astype(bool)


class SSMParams(nn.Module):
  """dt_bias, A_log and D `[H]` of one SSM, and the step sizes dt = clip(softplus(dt_raw + dt_bias), dt_limit)."""
  num_heads: int
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  dt_limit: Sequence[float] = (0.0, float("inf"))
  a_init_range: Sequence[float] = (1.0, 16.0)

  def setup(self):
    heads = lambda init: nn.with_logical_partitioning(init, ("heads",))
    self.dt_bias = self.param("dt_bias", heads(dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor)),
                              (self.num_heads,), jnp.float32)
    self.A_log = self.param("A_log", heads(a_log_init(*self.a_init_range)), (self.num_heads,), jnp.float32)
    self.D = self.param("D", heads(nn.initializers.ones), (self.num_heads,), jnp.float32)

  def A(self):
    return -jnp.exp(self.A_log)

  def steps(self, dt_raw, mask=None):
    """dt `[B,T,H]` in float32; zero where mask is False (padded tokens neither write nor decay)."""
    dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + self.dt_bias)
    lo, hi = self.dt_limit
    if lo > 0 or hi < float("inf"):
      dt = jnp.clip(dt, lo, hi)
    return dt if mask is None else jnp.where(mask[..., None], dt, 0.0)

  def __call__(self, dt_raw, mask=None):
    return self.steps(dt_raw, mask), self.A(), self.D


@register("mamba2")
class Mamba2(nn.Module):
  """Mamba2 mixer: x `[B,T,d]` -> y `[B,T,d]`.

  expand: inner width expand * d; head_dim P (or num_heads, which sets P = inner // num_heads); state_dim N;
  num_groups G of shared B, C (G divides H); conv_width of the causal depthwise conv; dt_min / dt_max /
  dt_init_floor: dt_bias initialisation; dt_limit: clamp of dt; a_init_range: A = -uniform(range) at init.
  causal=False runs the non-causal SSD with a centred conv (the 1-D VSSD mixer).
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
  dtype: Optional[jnp.dtype] = None

  def _operands(self, x, mask, decode):
    if x.ndim != 3:
      raise ValueError(f"x must have shape [B,T,d], got {tuple(x.shape)}")
    b, t, d = x.shape
    inner, h, p = head_layout(d, self.expand, self.head_dim, self.num_heads, self.num_groups, x.shape)
    g, n = self.num_groups, self.state_dim
    mask = check_mask(mask, x)
    zxbcdt = projection(2 * inner + 2 * g * n + h, ("embed", "mlp"), use_bias=self.use_bias, name="in_proj",
                        dtype=self.dtype)(x)
    z, xbc, dt_raw = jnp.split(zxbcdt, [inner, 2 * inner + 2 * g * n], axis=-1)
    xbc = ShortConv(self.conv_width, causal=self.causal, use_bias=self.conv_bias, channel_axis="mlp",
                    kernel_init=torch_conv_init(self.conv_width), bias_init=torch_conv_init(self.conv_width),
                    name="conv")(xbc, mask=mask, decode=decode)
    xs, bs, cs = jnp.split(xbc, [inner, inner + g * n], axis=-1)
    dt, a, d_skip = SSMParams(h, self.dt_min, self.dt_max, self.dt_init_floor, self.dt_limit,
                              self.a_init_range, name="ssm")(dt_raw, mask)
    return dict(z=z, x=xs.reshape(b, t, h, p), dt=dt, A=a, B=bs.reshape(b, t, g, n), C=cs.reshape(b, t, g, n),
                D=d_skip)

  def __call__(self, x, *, mask=None, decode=False):
    return self._run(x, mask, decode, "output")

  def mixing_matrix(self, x, *, mask=None):
    """The SSM's mixing matrix `[B,H,T,T]` over time for input x (semiseparable when causal), D on its diagonal.

    y_ssm[:, t, h] = sum_s M[:, h, t, s] x_ssm[:, s, h] with x_ssm the conv's output split into heads
    (`ssm_inputs`); the gate, norm and projections around it are not part of M.
    """
    return self._run(x, mask, False, "matrix")

  def ssm_inputs(self, x, *, mask=None):
    """The SSM's operands for input x: dict of z `[B,T,inner]`, x `[B,T,H,P]`, dt, A, B, C, D."""
    return self._run(x, mask, False, "inputs")

  @nn.compact
  def _run(self, x, mask, decode, what):
    if decode and not self.causal:
      raise ValueError("decode=True needs a causal Mamba2")
    ops = self._operands(x, mask, decode)
    if what == "inputs":
      return ops
    if what == "matrix":
      return ssd_matrix(ops["dt"], ops["A"], ops["B"], ops["C"], D=ops["D"], causal=self.causal)
    b, t, h, p = ops["x"].shape
    state, ready = None, False
    if decode:
      state, ready = decode_cache(self, "ssm_state", (b, h, p, self.state_dim))
    y = maybe_sequence_parallel(ssd)(ops["x"], ops["dt"], ops["A"], ops["B"], ops["C"], D=ops["D"], causal=self.causal,
            chunk_size=self.chunk_size, initial_state=state.value if ready else None, return_state=ready,
            impl=self.impl)
    if ready:
      y, state.value = y
    y = GatedRMSNorm(eps=self.norm_eps, norm_before_gate=False, group_size=h * p // self.num_groups,
                     name="norm")(y.reshape(b, t, h * p), ops["z"])
    y = projection(x.shape[-1], ("mlp", "embed"), use_bias=self.use_bias, name="out_proj", dtype=self.dtype)(y)
    return constrain(y)
