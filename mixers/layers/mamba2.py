"""Mamba2 sequence mixer (arXiv 2405.21060).

  [z, xBC, dt] = x W_in;  xBC = silu(conv1d(xBC));  [x, B, C] = xBC
  dt = clip(softplus(dt + dt_bias), dt_limit);  A = -exp(A_log)
  y = W_out gated_rmsnorm(ssd(x, dt, A, B, C, D), z)
Decode keeps the conv window and the SSM state `[B,H,P,N]` in the `cache` collection; any chunk length
continues from them, so decoding token by token reproduces the full forward.
"""
import flax.linen as nn
import jax.numpy as jnp

from mixers import ops
from mixers.layers.common import GatedRMSNorm, check_mask, check_segment_ids, check_x
from mixers.layers.decode_cache import cached_recurrence
from mixers.layers.ssm_family import SSMLayer
from mixers.registry import register


@register("mamba2")
class Mamba2(SSMLayer):
  """Mamba2 mixer: x `[B,T,d]` -> y `[B,T,d]` (fields in `SSMLayer`).

  causal=False runs the non-causal SSD with a centred conv (the 1-D VSSD mixer).
  """

  @nn.compact
  def operands(self, x, *, mask=None, decode=False, segment_ids=None):
    """The SSD's operands for x `[B,T,d]`: (dict x `[B,T,H,P]`, dt `[B,T,H]`, A `[H]`, B, C `[B,T,G,N]`, D `[H]`;
    gate z `[B,T,inner]`); segment_ids `[B,T]` or None: the conv stays within each segment."""
    check_x(self, x)
    self.check_modes(decode)
    segment_ids = check_segment_ids(self, segment_ids, x.shape)
    return self.ssd_operands(x, check_mask(mask, x.shape), decode=decode, segment_ids=segment_ids)

  def mixing_matrix(self, x, *, mask=None, segment_ids=None):
    """The SSD's mixing matrix `[B,H,T,T]` (semiseparable when causal), D on its diagonal.

    y_ssm[:, t, h] = sum_s M[:, h, t, s] x[:, s, h] with x the operands' x; the gate, norm and projections
    around the SSD are not part of M. segment_ids `[B,T]` or None: M is zero between segments.
    """
    o, _ = self.operands(x, mask=mask, segment_ids=segment_ids)
    return ops.ssd_matrix(o["dt"], o["A"], o["B"], o["C"], D=o["D"], causal=self.causal, segment_ids=segment_ids)

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False, segment_ids=None):
    """y `[B,T,d_model]` from x `[B,T,d_model]`.

    mask: `[B,T]` bool, True at real tokens (padded tokens neither write nor decay the state), or None.
    decode: causal only; continue from the `cache` collection (the protocol: `mixers.layers.decode_cache`).
      O(1) state per token.
    segment_ids: `[B,T]` ints or None (packed sequences; a segment is a run of equal ids): each segment is mixed as
      its own sequence (the conv and the SSM state restart); decoding, the chunk's first segment continues the
      cache, and the cache keeps the last segment's conv inputs and state.
    """
    operands, z = self.operands(x, mask=mask, decode=decode, segment_ids=segment_ids)
    segment_ids = check_segment_ids(self, segment_ids, x.shape)
    b, _, h, p = operands["x"].shape
    packed = {} if segment_ids is None else {"segment_ids": segment_ids}

    def scan(state):
      if not self.causal:
        return ops.ssd(**operands, causal=False, chunk_size=self.chunk_size, impl=self.impl, **packed), None
      return ops.ssd(**operands, chunk_size=self.chunk_size, initial_state=state, return_state=True, impl=self.impl,
                     **packed)

    y = cached_recurrence(self, scan, lambda: jnp.zeros((b, h, p, self.state_dim), jnp.float32), decode=decode)
    return self.output(y, z, x.shape[-1])

  def gate(self, y, z):
    """rmsnorm(y * silu(z)) over groups of inner / num_groups channels."""
    return GatedRMSNorm(eps=self.norm_eps, group_size=y.shape[-1] // self.num_groups, name="norm", **self.kw())(y, z)
