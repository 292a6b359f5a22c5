"""Monarch MLP channel mixer: a GLU whose dense maps are Monarch matrices (M2's MLP).

  y = M_down (act(M_gate x) * M_up x),   M = P L P R with block-diagonal L, R (`mixers.ops.monarch`)
"""
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers.layers.common import Dtype, compute_dtype, constrain
from mixers.ops.monarch import monarch, monarch_matrix
from mixers.registry import register


class MonarchLinear(nn.Module):
  """`y = monarch(x, L, R)`: x `[..., n_in]` -> `[..., features]` with `nblocks` blocks per factor.

  R `[nblocks, m/nblocks, n_in/nblocks]`, L `[nblocks, features/nblocks, m/nblocks]`, with the
  intermediate width m = max(n_in, features); nblocks = 1 is a dense product `L R` (any matrix).
  The factors are O(n sqrt n) and left unsharded (logical axes None).
  """
  features: int
  nblocks: int = 4
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  def factors(self, n_in):
    nb = self.nblocks
    if n_in % nb or self.features % nb:
      raise ValueError(f"nblocks={nb} must divide the input width {n_in} and features={self.features}")
    m = max(n_in, self.features) // nb
    per_block = nn.initializers.lecun_normal(in_axis=-1, out_axis=-2, batch_axis=(0,))
    init = lambda: nn.with_logical_partitioning(per_block, (None, None, None))
    R = self.param("R", init(), (nb, m, n_in // nb), self.param_dtype)
    L = self.param("L", init(), (nb, self.features // nb, m), self.param_dtype)
    return L, R

  @nn.compact
  def __call__(self, x):
    L, R = self.factors(x.shape[-1])
    dtype = compute_dtype(self.dtype, x, L)
    return monarch(x.astype(dtype), L.astype(dtype), R.astype(dtype))


@register("monarch_mlp", kind="channel")
class MonarchMLP(nn.Module):
  """GLU channel mixer with Monarch maps: x `[..., d]` -> `[..., d]`, hidden width `expansion * d`
  (or `hidden`). nblocks: blocks per Monarch factor (must divide d and the hidden width)."""
  expansion: int = 4
  hidden: Optional[int] = None
  nblocks: int = 4
  activation: Callable = jax.nn.silu
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """y `[..., d]` from x `[..., d]` (position-wise)."""
    d = x.shape[-1]
    h = self.hidden or self.expansion * d
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = MonarchLinear(h, self.nblocks, name="gate", **kw)(x)
    up = MonarchLinear(h, self.nblocks, name="up", **kw)(x)
    return constrain(MonarchLinear(d, self.nblocks, name="down", **kw)(self.activation(gate) * up))


def dense_weights(params):
  """`{"gate", "up", "down"}` dense matrices `[out, in]` of a MonarchMLP's (unboxed) params."""
  return {name: monarch_matrix(p["L"], p["R"]) for name, p in params.items()}
