"""Multi-dimensional relative positional encodings as layers usable by any mixer: MD-LRPE and MD-TPE (LightNet).

MdLrpe turns q or k `[B,*spatial,H,D]` into `[B,*spatial,H,2D]` so that scores depend on the relative n-D offset.
MdTpe is a token mixer returning an encoding to add to x: per head a Toeplitz sum lambda_h^{|offset|} along every
grid axis (causal: past only), summed over axes, RMS-normalised per head, then projected.
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers.layers.common import Dtype, compute_dtype, grid_tokens, projection, rms_normalize
from mixers.layers.decode_cache import cached_recurrence, check_decode
from mixers.ops import positional


class MdLrpe(nn.Module):
  """MD-LRPE: x `[..., H, D]` at coordinates `[..., n]` -> [x cos(phi), x sin(phi)] `[..., H, 2D]`, no parameters.

  The D channels are split across the n grid axes; phi_i = theta_i * p_{axis(i)} with theta_j = base^(-j/D_a).
  """
  base: float = 10000.0

  def phases(self, positions, dim):
    """phi `[..., 1, dim]` (broadcast over heads) from coordinates `[..., n]`."""
    return positional.lrpe_phases(positions, dim, self.base)[..., None, :]

  def __call__(self, x, positions):
    return positional.lrpe(x, self.phases(positions, x.shape[-1]))


class MdTpe(nn.Module):
  """MD-TPE encoding e `[B,*spatial,d]` (add it: x + e) of x `[B,*spatial,d]` or `[B,T,d]` (+ `grid_shape`).

  e = W_o rmsnorm_h(sum_a sum_{p'_a} lambda_h^{|p_a - p'_a|} x[p']), lambda_h = sigmoid(w_h) per head. Causal:
  1-D only, past tokens only; decode keeps the decayed running sum in the `cache` collection.
  """
  num_heads: int = 8
  causal: bool = False
  grid_shape: Optional[Sequence[int]] = None
  decay_init: Sequence[float] = (0.5, 0.99)
  eps: float = 1e-6
  chunk_size: int = 64
  impl: str = "auto"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  def _log_decay(self):
    lo, hi = self.decay_init
    h = self.num_heads

    def init(key, shape, dtype=jnp.float32):
      del key
      lam = jnp.linspace(lo, hi, h, dtype=dtype).reshape(shape)
      return jnp.log(lam) - jnp.log1p(-lam)  # logit, so sigmoid gives lambda

    w = self.param("decay_logit", nn.with_logical_partitioning(init, ("heads",)), (h,), self.param_dtype)
    return jax.nn.log_sigmoid(w.astype(jnp.float32))

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False, segment_ids=None):
    """e of x's shape from x `[B,T,d]` or `[B,*spatial,d]`; mask `[B,T]` or `[B,*spatial]` (True at real
    tokens) or None; decode (causal only) continues the running sum from the `cache` collection.

    segment_ids: None or `[B,T]` ints for a 1-D x (packed sequences): each segment is encoded as its own sequence;
    decoding after a packed prompt, each row continues its last segment (the cached sum is that segment's).
    """
    check_decode(self, decode)
    xf, grid, mask = grid_tokens(self, x, mask)
    b, t, d = xf.shape
    h = self.num_heads
    if d % h:
      raise ValueError(f"num_heads={h} must divide the width {d} of x {tuple(x.shape)}")
    if mask is not None:
      xf = xf * mask[..., None].astype(xf.dtype)
    log_decay = self._log_decay()
    xh = xf.reshape((b,) + grid + (h, d // h))

    def run(state):
      kw = dict(chunk_size=self.chunk_size, impl=self.impl, segment_ids=segment_ids)
      if not self.causal:
        return positional.md_tpe(xh, log_decay, causal=False, **kw), None
      return positional.md_tpe(xh, log_decay, causal=True, initial_state=state, return_state=True, **kw)

    y = cached_recurrence(self, run, lambda: jnp.zeros((b, h, 1, d // h), jnp.float32), decode=decode)
    y = rms_normalize(y, self.eps).reshape(b, t, d)
    scale = self.param("norm_scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,),
                       self.param_dtype)
    y = (y * scale.astype(jnp.float32)).astype(compute_dtype(self.dtype, x, scale))
    out = projection(d, (None, "embed"), kernel_init=nn.initializers.normal(0.02), name="out_proj", dtype=self.dtype,
                     param_dtype=self.param_dtype)(y)
    return out.reshape(x.shape)
