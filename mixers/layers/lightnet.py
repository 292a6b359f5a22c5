"""LightNet sequence mixer (arXiv 2405.21022).

  q = silu(x W_q), k = x W_k, v = x W_v                        `[B,T,H,K]`, `[B,T,H,K]`, `[B,T,H,V]`
  o = lightnet(lrpe(q), normalised-k with lrpe, v)            keys softmax-normalised over (past) positions
  y = W_o (rmsnorm(o) * silu(x W_g1 W_g2))                    low-rank output gate

Non-causal inputs may be a token grid `[B,*spatial,d]` (or `[B,T,d]` with `grid_shape`): one pass whatever the
grid's rank, MD-LRPE rotating each part of the key channels by its own grid axis. Causal decode keeps
(S, log running sum, position) in the `cache` collection.
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers.layers.common import GatedRMSNorm, constrain, decode_cache, projection
from mixers.layers.positional import MdLrpe, token_grid
from mixers.ops import positional
from mixers.ops.lightnet import lightnet
from mixers.registry import register
from mixers.sharding import maybe_sequence_parallel


@register("lightnet")
class LightNet(nn.Module):
  """LightNet mixer: x `[B,T,d]` or `[B,*spatial,d]` -> y of the same shape.

  num_heads: heads H; head_dim: key channels K per head (default d // H); values take d // H per head.
  gate_rank: rank of the output gate. use_lrpe / lrpe_base: MD-LRPE on q and k (doubles the state's key axis).
  grid_shape: read a `[B,T,d]` input as this grid (non-causal). chunk_size, impl: of the causal core.
  """
  num_heads: int = 8
  head_dim: Optional[int] = None
  causal: bool = True
  gate_rank: int = 32
  use_lrpe: bool = True
  lrpe_base: float = 10000.0
  grid_shape: Optional[Sequence[int]] = None
  norm_eps: float = 1e-5
  chunk_size: int = 64
  impl: str = "auto"
  dtype: Optional[jnp.dtype] = None

  def _positions(self, grid, t, offset):
    if len(grid) > 1:
      return positional.grid_positions(grid).reshape(1, t, len(grid))
    return (offset + jnp.arange(t))[None, :, None]

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False):
    shape = x.shape
    xf, grid = token_grid(x, self.grid_shape)
    b, t, d = xf.shape
    h = self.num_heads
    if d % h:
      raise ValueError(f"num_heads={h} must divide the width {d} of x {tuple(shape)}")
    if self.causal and len(grid) != 1:
      raise ValueError(f"a causal LightNet reads a 1-D sequence, got grid {grid} from x {tuple(shape)}")
    if mask is not None:
      if mask.shape not in (tuple(shape[:-1]), (b, t)):
        raise ValueError(f"mask must have shape {tuple(shape[:-1])}, got {tuple(mask.shape)}")
      mask = mask.reshape(b, t).astype(bool)
    if decode and not self.causal:
      raise ValueError("decode=True needs a causal LightNet")
    dk, dv = self.head_dim or d // h, d // h
    q = jax.nn.silu(projection((h, dk), ("embed", "heads", "kv"), name="q_proj", dtype=self.dtype)(xf))
    k = projection((h, dk), ("embed", "heads", "kv"), name="k_proj", dtype=self.dtype)(xf)
    v = projection((h, dv), ("embed", "heads", "kv"), name="v_proj", dtype=self.dtype)(xf)

    state, ready, position = None, False, None
    if decode:
      s_var, ready = decode_cache(self, "state", (b, h, dk * (2 if self.use_lrpe else 1), dv))
      z_var, _ = decode_cache(self, "log_sum", (b, h, dk), init_fn=lambda s, dt: jnp.full(s, -jnp.inf, dt))
      position, _ = decode_cache(self, "position", (), jnp.int32)
      if ready:
        state = (s_var.value, z_var.value)
    offset = position.value if ready else 0
    phases = (MdLrpe(self.lrpe_base).phases(self._positions(grid, t, offset), dk) if self.use_lrpe else None)
    o, new_state = maybe_sequence_parallel(lightnet)(q, k, v, causal=self.causal, initial_state=state,
                                                     return_state=True, mask=mask, phases=phases,
                                                     chunk_size=self.chunk_size, impl=self.impl)
    if ready:
      s_var.value, z_var.value = new_state
      position.value = position.value + t

    gate = projection(self.gate_rank, ("embed", "mlp"), name="gate_down", dtype=self.dtype)(xf)
    # The gate scales the heads' outputs, so it carries their axes (heads, kv), not embed.
    gate = projection((h, dv), ("mlp", "heads", "kv"), name="gate_up", dtype=self.dtype)(gate).reshape(b, t, h * dv)
    o = GatedRMSNorm(eps=self.norm_eps, norm_before_gate=True, axis_name="embed")(o.reshape(b, t, h * dv), gate)
    y = projection(d, ("mlp", "embed"), name="out_proj", dtype=self.dtype)(o)
    return constrain(y).reshape(shape)

