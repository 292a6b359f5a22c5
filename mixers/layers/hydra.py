"""Hydra sequence mixer (arXiv 2407.09941): a bidirectional SSM through a quasiseparable matrix.

  [z, xBC, dt] = x W_in;  xBC = silu(conv1d_centred(xBC));  [x, Bf, Cf, Bb, Cb] = xBC;  [dtf, dtb] = dt
  dt = clip(softplus(dt + dt_bias), dt_limit) (one dt_bias for both directions);  A = -exp(A_log)
  D_t = x_t W_D + D  (data-dependent diagonal, per token and head)
  y = W_out gated_rmsnorm(quasiseparable(x, dt, A, B, C, D_t), z)   (norm before the gate)
Padded tokens (mask False) are zeroed before the conv and get dt = 0, so they leak into no real token.
"""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from mixers import ops
from mixers.layers.common import GatedRMSNorm, check_mask, check_segment_ids, check_x, projection
from mixers.layers.ssm_family import SSMLayer
from mixers.registry import register


@register("hydra")
class Hydra(SSMLayer):
  """Hydra mixer (non-causal): x `[B,T,d]` -> y `[B,T,d]` (fields in `SSMLayer`).

  conv_width: the centred depthwise conv; a_init_range: A = -uniform(range) at init (Hydra starts at A = -1).
  """
  state_dim: int = 64
  conv_width: int = 7
  causal: bool = False
  a_init_range: Sequence[float] = (1.0, 1.0)

  supports_causal = False

  @nn.compact
  def operands(self, x, *, mask=None, decode=False, segment_ids=None):
    """The quasiseparable op's operands for x `[B,T,d]`: (dict x `[B,T,H,P]`, dt, B, C as (forward, backward)
    pairs, A `[H]`, D `[B,T,H]`, mask `[B,T]`; gate z `[B,T,inner]`); segment_ids `[B,T]` or None: the conv stays
    within each segment."""
    check_x(self, x)
    self.check_modes(decode)
    mask = check_mask(mask, x.shape)
    segment_ids = check_segment_ids(self, segment_ids, x.shape)
    z, xs, [(bf, cf, dtf), (bb, cb, dtb)] = self.project(x, mask, directions=2, segment_ids=segment_ids)
    b, t, h, p = xs.shape
    ssm = self.ssm_params(h)
    d_tok = projection(h, ("mlp", "heads"), name="fc_D", **self.kw())(xs.reshape(b, t, h * p))
    return dict(x=xs, dt=(ssm.steps(dtf, mask), ssm.steps(dtb, mask)), A=ssm.A(), B=(bf, bb), C=(cf, cb),
                D=d_tok.astype(jnp.float32) + ssm.D, mask=mask), z

  def mixing_matrix(self, x, *, mask=None, segment_ids=None):
    """The quasiseparable mixing matrix `[B,H,T,T]` (D_t on the diagonal), as in `Mamba2.mixing_matrix`."""
    o, _ = self.operands(x, mask=mask, segment_ids=segment_ids)
    return ops.quasiseparable_matrix(o["dt"], o["A"], o["B"], o["C"], D=o["D"], mask=o["mask"],
                                     segment_ids=segment_ids)

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False, segment_ids=None):
    """y `[B,T,d_model]` from x `[B,T,d_model]` (bidirectional).

    mask: `[B,T]` bool, True at real tokens (padded tokens leak into no real token), or None.
    decode: must be False (Hydra is non-causal).
    segment_ids: `[B,T]` ints or None (packed sequences; a segment is a run of equal ids): each segment is mixed as
      its own sequence (the conv, both scans and their shifts stay within it).
    """
    operands, z = self.operands(x, mask=mask, decode=decode, segment_ids=segment_ids)
    segment_ids = check_segment_ids(self, segment_ids, x.shape)
    packed = {} if segment_ids is None else {"segment_ids": segment_ids}
    y = ops.quasiseparable(**operands, chunk_size=self.chunk_size, impl=self.impl, **packed)
    return self.output(y, z, x.shape[-1])

  def gate(self, y, z):
    """rmsnorm(y) * silu(z)."""
    return GatedRMSNorm(eps=self.norm_eps, norm_before_gate=True, name="norm", **self.kw())(y, z)
