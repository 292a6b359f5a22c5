"""Building blocks shared by the mixer layers: input checks, projections with logical axes, norms, short convs."""
import math
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers.layers.decode_cache import cached_recurrence, check_decode, segment_index
from mixers.ops import checks

Dtype = Any
ACTIVATIONS = ("batch", "length", "embed")


def compute_dtype(dtype, *arrays):
  """flax's rule: `dtype` when given, else the promotion of the dtypes of `arrays` (inputs and parameters, or
  dtypes), made floating."""
  if dtype is not None:
    return jnp.dtype(dtype)
  result = jnp.result_type(*(jnp.dtype(getattr(a, "dtype", a)) for a in arrays))
  return result if jnp.issubdtype(result, jnp.inexact) else jnp.promote_types(result, jnp.float32)


def check_x(module, x, *, grid=False):
  """ValueError unless x is `[B,T,d_model]` (or, with `grid`, `[B,*spatial,d_model]`)."""
  if x.ndim == 3 or (grid and x.ndim > 3):
    return
  expected = "[B,T,d_model] or [B,*spatial,d_model]" if grid else "[B,T,d_model]"
  raise ValueError(f"{type(module).__name__}: x must have shape {expected}, got {tuple(x.shape)}")


def head_width(num_heads, head_dim, d_model):
  """The per-head width: `head_dim`, or d_model // num_heads (ValueError naming both when it does not divide)."""
  if not isinstance(num_heads, int) or num_heads <= 0:
    raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
  if head_dim is not None:
    return head_dim
  if d_model % num_heads:
    raise ValueError(f"num_heads={num_heads} must divide d_model={d_model} (the last axis of x), or set head_dim")
  return d_model // num_heads


def constrain(x, axes=ACTIVATIONS):
  """Logical sharding constraint on an activation (a no-op outside a mesh with rules)."""
  return nn.with_logical_constraint(x, axes)


def token_grid(x, grid_shape=None):
  """(x as `[B,T,d]`, spatial shape) for x `[B,*spatial,d]`, or x `[B,T,d]` read as a `grid_shape` grid."""
  if x.ndim < 3:
    raise ValueError(f"x must have shape [B,T,d] or [B,*spatial,d], got {tuple(x.shape)}")
  if x.ndim > 3:
    if grid_shape is not None and tuple(grid_shape) != tuple(x.shape[1:-1]):
      raise ValueError(f"grid_shape={tuple(grid_shape)} disagrees with the grid of x {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1, x.shape[-1]), tuple(x.shape[1:-1])
  if grid_shape is None:
    return x, (x.shape[1],)
  grid_shape = tuple(grid_shape)
  if math.prod(grid_shape) != x.shape[1]:
    raise ValueError(f"grid_shape={grid_shape} holds {math.prod(grid_shape)} tokens but x {tuple(x.shape)} has "
                     f"T={x.shape[1]}")
  return x, grid_shape


def grid_tokens(module, x, mask=None):
  """(x `[B,T,d]`, grid, mask `[B,T]` bool or None) for x `[B,*spatial,d]` or `[B,T,d]` read as `module.grid_shape`.

  A causal module reads a 1-D sequence only.
  """
  xf, grid = token_grid(x, module.grid_shape)
  if module.causal and len(grid) != 1:
    raise ValueError(f"a causal {type(module).__name__} reads a 1-D sequence, got grid {grid} from x {tuple(x.shape)}")
  return xf, grid, check_mask(mask, x.shape)


def check_mask(mask, shape):
  """mask `[B,*spatial]` or `[B,T]` (True at real tokens) for an input of `shape` `[B,*spatial,d]` -> bool `[B,T]`.

  None passes through; any other shape is a ValueError naming the expected ones.
  """
  if mask is None:
    return None
  b, t = shape[0], math.prod(shape[1:-1])
  if tuple(mask.shape) not in (tuple(shape[:-1]), (b, t)):
    expected = f"[B,T] = {(b, t)}" if len(shape) == 3 else f"{tuple(shape[:-1])} or [B,T] = {(b, t)}"
    raise ValueError(f"mask must have shape {expected} for x {tuple(shape)}, got {tuple(mask.shape)}")
  return mask.reshape(b, t).astype(bool)


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
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    axis = tuple(sorted(a % x.ndim for a in self.axis))
    n_in, n_out = len(axis), len(self.features)
    if len(self.axes) != n_in + n_out:
      raise ValueError(f"axes {self.axes} must name {n_in} input and {n_out} output dims")
    init = self.kernel_init or nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                        tuple(x.shape[a] for a in axis) + self.features, self.param_dtype)
    dtype = compute_dtype(self.dtype, x, kernel)
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), ((axis, tuple(range(n_in))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.axes[n_in:]), self.features,
                        self.param_dtype)
      y = y + bias.astype(dtype)
    return y


def projection(features, axes: Sequence[str], *, axis=-1, use_bias=False, kernel_init=None, name=None,
               dtype=None, param_dtype=jnp.float32, bias_init=nn.initializers.zeros):
  """A `Projection` to `features` (int or tuple) whose kernel carries the logical `axes` (input then output)."""
  features = (features,) if isinstance(features, int) else tuple(features)
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  return Projection(features=features, axes=tuple(axes), axis=axis, use_bias=use_bias, kernel_init=kernel_init,
                    bias_init=bias_init, dtype=dtype, param_dtype=param_dtype, name=name)


def rms_normalize(x, eps):
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
  """y = x / rms(x) * scale over the last axis, computed in float32; returned in `dtype` (None: x's and scale's)."""
  eps: float = 1e-6
  axis_name: Optional[str] = "embed"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    return (rms_normalize(x, self.eps) * scale.astype(jnp.float32)).astype(compute_dtype(self.dtype, x, scale))


class GatedRMSNorm(nn.Module):
  """Mamba2's gated norm: norm(x * silu(z)) (or norm(x) * silu(z)), normalised in groups of `group_size`."""
  eps: float = 1e-5
  norm_before_gate: bool = False
  group_size: Optional[int] = None
  axis_name: Optional[str] = "mlp"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, z):
    d = x.shape[-1]
    g = self.group_size or d
    if d % g:
      raise ValueError(f"group_size={g} must divide the feature size {d} of x {x.shape}")
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (d,), self.param_dtype)
    out_dtype = compute_dtype(self.dtype, z, scale)
    gate = jax.nn.silu(z.astype(jnp.float32))
    x = x.astype(jnp.float32)
    if not self.norm_before_gate:
      x = x * gate
    y = rms_normalize(x.reshape(*x.shape[:-1], d // g, g), self.eps).reshape(x.shape)
    if self.norm_before_gate:
      y = y * gate
    return (y * scale.astype(jnp.float32)).astype(out_dtype)


def torch_conv_init(width):
  """U(-1/sqrt(width), 1/sqrt(width)), PyTorch's default for a depthwise Conv1d (Mamba2's and Hydra's conv)."""
  bound = width ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class ShortConv(nn.Module):
  """Depthwise convolution over time, y_t = act(sum_j w_j x_{t+j-offset} + b), x and y `[B,T,C]`.

  Causal: offset = width-1 (only past inputs); otherwise centred ('same' padding). Padded positions
  (mask False) are zeroed first so they leak into no real token. With segment_ids (packed sequences) no tap reads
  a token of another segment. In decode mode the last width-1 inputs are kept in the `cache` collection (only
  the last segment's: zeros before it).
  """
  width: int = 4
  causal: bool = True
  activation: Optional[Callable] = jax.nn.silu
  use_bias: bool = True
  channel_axis: Optional[str] = None
  kernel_init: Callable = nn.initializers.lecun_normal(in_axis=0, out_axis=1)
  bias_init: Callable = nn.initializers.zeros
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False, segment_ids=None):
    """x `[B,T,C]` -> y `[B,T,C]`; mask `[B,T]` (True at real tokens) or None; decode: continue from the cache.

    segment_ids: `[B,T]` ints (packed sequences, a segment is a run of equal ids) or None: each segment is
      convolved as its own sequence; decoding, the chunk's first segment continues the cached inputs.
    """
    if x.ndim != 3:
      raise ValueError(f"x must be [B,T,C], got shape {x.shape}")
    b, t, c = x.shape
    segment_ids = checks.check_segment_ids(segment_ids, b, t)
    seg = None if segment_ids is None else segment_index(segment_ids)
    w = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, ("conv", self.channel_axis)),
                   (self.width, c), self.param_dtype)
    bias = (self.param("bias", nn.with_logical_partitioning(self.bias_init, (self.channel_axis,)), (c,),
                       self.param_dtype) if self.use_bias else None)
    x = x.astype(compute_dtype(self.dtype, x, w))
    if mask is not None:
      x = x * mask[..., None].astype(x.dtype)
    window = self.width - 1
    if self.causal:
      zeros = lambda: jnp.zeros((b, window, c), x.dtype)

      # the cached inputs before the chunk belong to its first segment (index 0)
      segp = None if seg is None else jnp.pad(seg, ((0, 0), (window, 0)))

      def preceded(past):  # x after the last width-1 inputs (zeros at the start), and the new last ones
        xp = jnp.concatenate([zeros() if past is None else past, x], axis=1)
        last = xp[:, xp.shape[1] - window:]
        if segp is not None:  # only the last segment's inputs are carried on
          last = last * (segp[:, segp.shape[1] - window:] == seg[:, -1:])[..., None].astype(x.dtype)
        return xp, last

      xp = cached_recurrence(self, preceded, zeros, decode=decode, name="conv_window")
    else:
      check_decode(self, decode)
      xp = jnp.pad(x, ((0, 0), (window // 2, window - window // 2), (0, 0)))
      segp = None if seg is None else jnp.pad(seg, ((0, 0), (window // 2, window - window // 2)), constant_values=-1)
    tap = lambda j: xp[:, j:j + t]  # the inputs tap j reads; packed: zero where they are in another segment
    if seg is not None:
      tap = lambda j: xp[:, j:j + t] * (segp[:, j:j + t] == seg)[..., None].astype(x.dtype)
    y = sum(tap(j) * w[j].astype(x.dtype) for j in range(self.width))
    if bias is not None:
      y = y + bias.astype(x.dtype)
    return self.activation(y) if self.activation is not None else y


def check_patterns(module, *, prefix_len=None, block_size=None):
  """ValueError unless the visibility patterns beyond causal (Prefix-LM's `prefix_len`, block-causal's `block_size`)
  come with causal=True, one at a time, block_size a positive integer and prefix_len None, an int or ints `[B]`."""
  name = type(module).__name__
  if block_size is not None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
      raise ValueError(f"{name}: block_size must be a positive integer or None, got {block_size!r}")
    if not module.causal:
      raise ValueError(f"{name}: block_size={block_size} (block-causal) needs causal=True")
  if prefix_len is not None:
    if not module.causal:
      raise ValueError(f"{name}: prefix_len (Prefix-LM) needs causal=True: a non-causal layer already reads the "
                       f"whole sequence")
    if block_size is not None:
      raise ValueError(f"{name}: prefix_len (Prefix-LM) and block_size={block_size} (block-causal) are two different "
                       f"masks: use one of them")
    if (isinstance(prefix_len, bool) or jnp.ndim(prefix_len) > 1
        or not jnp.issubdtype(jnp.result_type(prefix_len), jnp.integer)):
      raise ValueError(f"{name}: prefix_len must be an int or an int array [B], got "
                       f"{getattr(prefix_len, 'shape', prefix_len)!r}")


def check_cross_decode(module, decode, context):
  """ValueError for decode=True with a context on a non-causal layer (before `check_decode`, to say why)."""
  if decode and context is not None and not module.causal:
    raise ValueError(f"{type(module).__name__}: decode=True with a context needs causal=True (causal cross attention "
                     f"decodes the context chunk beside each x chunk); non-causal cross attention keeps no decode "
                     f"cache")


def check_context(module, x, context, context_mask, mask, *, aligned=False):
  """(source, source mask): what keys and values are computed from, the context (cross attention) or x.

  context `[B,Tk,d_model]` (x `[B,T,d_model]`) or None; context_mask `[B,Tk]` (True at real context tokens) or None.
  aligned: the layer pairs target t with source t (its decays or positions run along one time axis), so Tk must
  equal T. Causal cross attention (target t reads sources s <= t) always needs Tk == T.
  """
  name = type(module).__name__
  if context is None:
    if context_mask is not None:
      raise ValueError(f"{name}: context_mask given without a context")
    return x, mask
  b, t, d = x.shape
  if context.ndim != 3 or context.shape[0] != b or context.shape[2] != d:
    raise ValueError(f"{name}: context must have shape [B,Tk,d_model] = ({b}, Tk, {d}) for x {tuple(x.shape)}, "
                     f"got {tuple(context.shape)}")
  if (module.causal or aligned) and context.shape[1] != t:
    why = ("causal cross attention: target t reads sources s <= t" if module.causal else
           "its decays or positions pair target t with source t, which two sequences of different lengths do not")
    raise ValueError(f"{name}: context must have x's length T={t} ({why}), got context {tuple(context.shape)}")
  return context, check_mask(context_mask, context.shape)


def prefix_lengths(prefix_len, batch, length):
  """prefix_len (int or `[B]`) -> int32 `[B]`; concrete values outside [0, length] raise ValueError."""
  return jnp.broadcast_to(jnp.asarray(checks.check_prefix_len(prefix_len, batch, length), jnp.int32), (batch,))


def check_segment_ids(module, segment_ids, shape, *, prefix_len=None, block_size=None, context=None, grid=None):
  """segment_ids `[B,T]` ints (packed sequences) for an input of `shape` `[B,T,d]`, as a jnp array, or None.

  ValueError naming segment_ids for another shape or dtype, and with prefix_len, block_size, a context (cross
  attention) or a grid of more than one axis, which packed sequences do not combine with.
  """
  if segment_ids is None:
    return None
  name = type(module).__name__
  b, t = shape[0], math.prod(shape[1:-1])
  try:
    ids = checks.check_segment_ids(segment_ids, b, t)
  except ValueError as e:
    raise ValueError(f"{name}: {e} (x {tuple(shape)})") from None
  clashes = [what for what, given in (("prefix_len", prefix_len is not None), ("block_size", block_size is not None),
                                      ("a context (cross attention)", context is not None),
                                      (f"a {len(grid or ())}-D grid", grid is not None and len(grid) > 1)) if given]
  if clashes:
    raise ValueError(f"{name}: segment_ids (packed sequences) cannot be combined with {', '.join(clashes)}")
  return ids
