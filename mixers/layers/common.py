"""Building blocks shared by the mixer layers: projections with logical axes, norms, short convs, caches."""
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
ACTIVATIONS = ("batch", "length", "embed")


def constrain(x, axes=ACTIVATIONS):
  """Logical sharding constraint on an activation (a no-op outside a mesh with rules)."""
  return nn.with_logical_constraint(x, axes)


class Projection(nn.Module):
  """y = x . W (+ b), contracting x's `axis` dims with W's leading dims; W `[*in, *features]` carries `axes`.

  The kernel is created at its full shape (fan-in = the contracted dims), so its logical axis names apply to
  it as it is under a mesh.
  """
  features: Tuple[int, ...]
  axes: Tuple[Optional[str], ...]
  axis: Tuple[int, ...] = (-1,)
  use_bias: bool = False
  kernel_init: Optional[Callable] = None
  bias_init: Callable = nn.initializers.zeros
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x):
    axis = tuple(sorted(a % x.ndim for a in self.axis))
    n_in, n_out = len(axis), len(self.features)
    if len(self.axes) != n_in + n_out:
      raise ValueError(f"axes {self.axes} must name {n_in} input and {n_out} output dims")
    init = self.kernel_init or nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                        tuple(x.shape[a] for a in axis) + self.features, jnp.float32)
    dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), ((axis, tuple(range(n_in))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.axes[n_in:]), self.features,
                        jnp.float32)
      y = y + bias.astype(dtype)
    return y


def projection(features, axes: Sequence[str], *, axis=-1, use_bias=False, kernel_init=None, name=None,
               dtype=None, bias_init=nn.initializers.zeros):
  """A `Projection` to `features` (int or tuple) whose kernel carries the logical `axes` (input then output)."""
  features = (features,) if isinstance(features, int) else tuple(features)
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  return Projection(features=features, axes=tuple(axes), axis=axis, use_bias=use_bias, kernel_init=kernel_init,
                    bias_init=bias_init, dtype=dtype, name=name)


def rms_normalize(x, eps):
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
  """y = x / rms(x) * scale over the last axis, computed in float32."""
  eps: float = 1e-6
  axis_name: Optional[str] = "embed"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), jnp.float32)
    return (rms_normalize(x, self.eps) * scale).astype(x.dtype)


class GatedRMSNorm(nn.Module):
  """Mamba2's gated norm: norm(x * silu(z)) (or norm(x) * silu(z)), normalised in groups of `group_size`."""
  eps: float = 1e-5
  norm_before_gate: bool = False
  group_size: Optional[int] = None
  axis_name: Optional[str] = "mlp"

  @nn.compact
  def __call__(self, x, z):
    d = x.shape[-1]
    g = self.group_size or d
    if d % g:
      raise ValueError(f"group_size={g} must divide the feature size {d} of x {x.shape}")
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (d,), jnp.float32)
    gate = jax.nn.silu(z.astype(jnp.float32))
    x = x.astype(jnp.float32)
    if not self.norm_before_gate:
      x = x * gate
    y = rms_normalize(x.reshape(*x.shape[:-1], d // g, g), self.eps).reshape(x.shape)
    if self.norm_before_gate:
      y = y * gate
    return (y * scale).astype(z.dtype)


def decode_cache(module: nn.Module, name: str, shape, dtype=jnp.float32, init_fn: Callable = jnp.zeros):
  """A `cache` variable and whether it existed before this call (False while `init` creates it)."""
  existed = module.has_variable("cache", name)
  return module.variable("cache", name, init_fn, shape, dtype), existed


def torch_conv_init(width):
  """U(-1/sqrt(width), 1/sqrt(width)), PyTorch's default for a depthwise Conv1d (Mamba2's and Hydra's conv)."""
  bound = width ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class ShortConv(nn.Module):
  """Depthwise convolution over time, y_t = act(sum_j w_j x_{t+j-offset} + b), x and y `[B,T,C]`.

  Causal: offset = width-1 (only past inputs); otherwise centred ('same' padding). Padded positions
  (mask False) are zeroed first so they leak into no real token. In decode mode the last width-1 inputs
  are kept in the `cache` collection.
  """
  width: int = 4
  causal: bool = True
  activation: Optional[Callable] = jax.nn.silu
  use_bias: bool = True
  channel_axis: Optional[str] = None
  kernel_init: Callable = nn.initializers.lecun_normal(in_axis=0, out_axis=1)
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False):
    if x.ndim != 3:
      raise ValueError(f"x must be [B,T,C], got shape {x.shape}")
    b, t, c = x.shape
    w = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, ("conv", self.channel_axis)),
                   (self.width, c))
    bias = (self.param("bias", nn.with_logical_partitioning(self.bias_init, (self.channel_axis,)), (c,))
            if self.use_bias else None)
    if mask is not None:
      x = x * mask[..., None].astype(x.dtype)
    left = self.width - 1 if self.causal else (self.width - 1) // 2
    right = self.width - 1 - left
    if decode:
      if not self.causal:
        raise ValueError("decode=True needs a causal ShortConv")
      window, ready = decode_cache(self, "conv_window", (b, self.width - 1, c), x.dtype)
      xp = jnp.concatenate([window.value if ready else jnp.zeros_like(window.value), x], axis=1)
      if ready:
        window.value = xp[:, xp.shape[1] - (self.width - 1):]
    else:
      xp = jnp.pad(x, ((0, 0), (left, right), (0, 0)))
    y = sum(xp[:, j:j + t] * w[j].astype(x.dtype) for j in range(self.width))
    if bias is not None:
      y = y + bias.astype(x.dtype)
    return self.activation(y) if self.activation is not None else y


def cached_recurrence(module: nn.Module, run: Callable, state_init: Callable, *, decode: bool):
  """Runs `run(initial_state) -> (y, final_state)`, keeping the state in `cache['state']` when decoding.

  `state_init()` returns the zero state (any pytree). Outside decode mode the recurrence starts from zero
  and nothing is stored; the first decode call (inside `init`) only creates the cache.
  """
  if not decode:
    return run(None)[0]
  existed = module.has_variable("cache", "state")
  state = module.variable("cache", "state", state_init)
  if not existed:
    return run(None)[0]
  y, state.value = run(state.value)
  return y


def decode_positions(module: nn.Module, batch: int, length: int, *, decode: bool):
  """Token positions `[B,T]`: 0..T-1, or continuing from the cached index when decoding."""
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  if not decode:
    return pos
  index, existed = decode_cache(module, "index", (), jnp.int32)
  if not existed:
    return pos
  start = index.value
  index.value = start + length
  return pos + start
