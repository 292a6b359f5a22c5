"""Hydra sequence mixer (arXiv 2407.09941): a bidirectional SSM through a quasiseparable matrix.

  [z, xBC, dt] = x W_in;  xBC = silu(conv1d_centred(xBC));  [x, Bf, Cf, Bb, Cb] = xBC;  [dtf, dtb] = dt
  dt = clip(softplus(dt + dt_bias), dt_limit) (one dt_bias for both directions);  A = -exp(A_log)
  D_t = x_t W_D + D  (data-dependent diagonal, per token and head)
  y = W_out gated_rmsnorm(quasiseparable(x, dt, A, B, C, D_t), z)   (norm before the gate)
Padded tokens (mask False) are zeroed before the conv and get dt = 0, so they leak into no real token.
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from mixers.layers.common import torch_conv_init, GatedRMSNorm, ShortConv, constrain, projection
from mixers.layers.mamba2 import SSMParams, check_mask, head_layout
from mixers.ops.quasiseparable import quasiseparable, quasiseparable_matrix
from mixers.registry import register
from mixers.sharding import maybe_sequence_parallel


@register("hydra")
class Hydra(nn.Module):
  """Hydra mixer (non-causal): x `[B,T,d]` -> y `[B,T,d]`.

  expand, head_dim / num_heads, state_dim, num_groups, dt_*: as in Mamba2; conv_width: the centred
  depthwise conv; a_init_range: A = -uniform(range) at init (Hydra starts at A = -1).
  """
  expand: float = 2
  head_dim: int = 64
  num_heads: Optional[int] = None
  state_dim: int = 64
  num_groups: int = 1
  conv_width: int = 7
  causal: bool = False
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  dt_limit: Sequence[float] = (0.0, float("inf"))
  a_init_range: Sequence[float] = (1.0, 1.0)
  use_bias: bool = False
  conv_bias: bool = True
  norm_eps: float = 1e-5
  chunk_size: int = 64
  impl: str = "auto"
  dtype: Optional[jnp.dtype] = None

  supports_causal = False

  def __call__(self, x, *, mask=None, decode=False):
    if decode:
      raise ValueError("Hydra is non-causal and cannot decode (decode=True)")
    return self._run(x, mask, "output")

  def mixing_matrix(self, x, *, mask=None):
    """The quasiseparable mixing matrix `[B,H,T,T]` for input x (D_t on the diagonal), as in Mamba2."""
    return self._run(x, mask, "matrix")

  def ssm_inputs(self, x, *, mask=None):
    """dict of z, x `[B,T,H,P]`, dt (pair), A, B (pair), C (pair), D `[B,T,H]`, mask."""
    return self._run(x, mask, "inputs")

  @nn.compact
  def _run(self, x, mask, what):
    if self.causal:
      raise ValueError("Hydra is bidirectional: causal must be False")
    if x.ndim != 3:
      raise ValueError(f"x must have shape [B,T,d], got {tuple(x.shape)}")
    b, t, d = x.shape
    inner, h, p = head_layout(d, self.expand, self.head_dim, self.num_heads, self.num_groups, x.shape)
    g, n = self.num_groups, self.state_dim
    mask = check_mask(mask, x)
    zxbcdt = projection(2 * inner + 4 * g * n + 2 * h, ("embed", "mlp"), use_bias=self.use_bias, name="in_proj",
                        dtype=self.dtype)(x)
    z, xbc, dt_raw = jnp.split(zxbcdt, [inner, 2 * inner + 4 * g * n], axis=-1)
    xbc = ShortConv(self.conv_width, causal=False, use_bias=self.conv_bias, channel_axis="mlp",
                    kernel_init=torch_conv_init(self.conv_width), bias_init=torch_conv_init(self.conv_width),
                    name="conv")(xbc, mask=mask)
    xs, bf, cf, bb, cb = jnp.split(xbc, [inner + i * g * n for i in range(4)], axis=-1)
    ssm = SSMParams(h, self.dt_min, self.dt_max, self.dt_init_floor, self.dt_limit, self.a_init_range, name="ssm")
    dt = (ssm.steps(dt_raw[..., :h], mask), ssm.steps(dt_raw[..., h:], mask))
    d_tok = projection(h, ("mlp", "heads"), name="fc_D", dtype=self.dtype)(xs).astype(jnp.float32) + ssm.D
    groups = lambda a: a.reshape(b, t, g, n)
    ops = dict(z=z, x=xs.reshape(b, t, h, p), dt=dt, A=ssm.A(), B=(groups(bf), groups(bb)),
               C=(groups(cf), groups(cb)), D=d_tok, mask=mask)
    if what == "inputs":
      return ops
    if what == "matrix":
      return quasiseparable_matrix(ops["dt"], ops["A"], ops["B"], ops["C"], D=d_tok, mask=mask)
    y = maybe_sequence_parallel(quasiseparable)(ops["x"], ops["dt"], ops["A"], ops["B"], ops["C"], D=d_tok, mask=mask,
                       chunk_size=self.chunk_size, impl=self.impl)
    y = GatedRMSNorm(eps=self.norm_eps, norm_before_gate=True, name="norm")(
        y.reshape(b, t, inner), z)
    y = projection(d, ("mlp", "embed"), use_bias=self.use_bias, name="out_proj", dtype=self.dtype)(y)
    return constrain(y)
