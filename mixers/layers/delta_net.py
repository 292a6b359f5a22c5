"""DeltaNet and Gated DeltaNet: linear attention whose state is written by the delta rule (`ops.delta_rule`)."""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers import ops
from mixers.layers import common, linear_family
from mixers.layers.decode_cache import cached_recurrence, check_decode
from mixers.layers.ssm_family import a_log_init, dt_bias_init
from mixers.registry import register


def l2_normalize(x, eps=1e-6):
  """x / ||x|| over the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def delta(module, q, k, v, beta, log_decay, *, causal, decode, chunk_size, impl, segment_ids=None):
  """`ops.delta_rule` over q, k `[B,T,H,K]`, v `[B,T,H,V]`, beta and log_decay `[B,T,H]`; causal layers keep the
  state `[B,H,K,V]` in the cache. Non-causal: the rule run both ways (the second pass over the reversed
  sequence), outputs summed. segment_ids `[B,T]` (packed sequences) or None: both passes restart at every
  segment; decoding, the chunk's first segment continues the cached state and the last segment's is kept."""
  kw = dict(log_decay=log_decay, chunk_size=chunk_size, impl=impl)
  if segment_ids is not None:
    kw["segment_ids"] = segment_ids
  if not causal:
    flip = lambda a: None if a is None else jnp.flip(a, axis=1)
    forward = ops.delta_rule(q, k, v, beta, **kw)
    along_time = {key: flip(val) if key in ("log_decay", "segment_ids") else val for key, val in kw.items()}
    backward = ops.delta_rule(*(flip(a) for a in (q, k, v, beta)), **along_time)
    return forward + flip(backward)

  def zero_state():
    return jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)

  run = lambda state: ops.delta_rule(q, k, v, beta, initial_state=state, return_state=True, **kw)
  return cached_recurrence(module, run, zero_state, decode=decode)


class DeltaRuleLayer(nn.Module):
  """The layer shared by DeltaNet and Gated DeltaNet: q, k, v projections, short convs + SiLU, L2-normalised q and
  k, beta = sigmoid(x W_beta) (times 2 with allow_neg_eigval: eigenvalues of I - beta k k^T in (-1, 1)), the
  delta rule, per-head RMSNorm, optional swish output gate, output projection. Subclasses give the log-decay."""
  num_heads: int = 4
  expand_k: float = 1.0
  expand_v: float = 1.0
  short_conv: bool = True
  conv_width: int = 4
  allow_neg_eigval: bool = False
  output_gate: bool = False
  norm_eps: float = 1e-6
  causal: bool = True
  chunk_size: int = 64
  impl: str = "auto"
  dtype: Optional[common.Dtype] = None
  param_dtype: common.Dtype = jnp.float32

  aliases = {**linear_family.FLA_ALIASES, "use_gate": "output_gate"}

  def log_decay(self, x, kw):
    """g `[B,T,H]` (<= 0) from x, or None (no decay)."""
    del x, kw
    return None

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False, segment_ids=None):
    """y `[B,T,d_model]` from x `[B,T,d_model]`.

    mask: `[B,T]` bool, True at real tokens (padded tokens neither write nor decay the state), or None.
    decode: causal only; continue from the `cache` collection (see `mixers.layers.decode_cache`); O(1) state.
    segment_ids: `[B,T]` ints or None (packed sequences; a segment is a run of equal ids): each segment is mixed as
      its own sequence (state and short convs restart); decoding, the chunk's first segment continues the cache and
      later chunks continue the last segment.
    """
    common.check_x(self, x)
    check_decode(self, decode)
    mask = common.check_mask(mask, x.shape)
    segment_ids = common.check_segment_ids(self, segment_ids, x.shape)
    dk, dv = linear_family.head_widths(x.shape[-1], self.num_heads, self.expand_k, self.expand_v)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = linear_family.qkv_projections(x, self.num_heads, dk, dv, **kw)
    if self.short_conv:  # ShortConv applies the SiLU
      q, k, v = linear_family.short_convs(q, k, v, causal=self.causal, width=self.conv_width, mask=mask,
                                          decode=decode, segment_ids=segment_ids, **kw)
    else:
      q, k, v = (jax.nn.silu(a) for a in (q, k, v))
    q, k = l2_normalize(q).astype(v.dtype), l2_normalize(k).astype(v.dtype)
    beta_logits = common.projection(self.num_heads, ("embed", "heads"), name="beta", **kw)(x)
    beta = jax.nn.sigmoid(beta_logits.astype(jnp.float32)) * (2.0 if self.allow_neg_eigval else 1.0)
    log_decay = self.log_decay(x, kw)
    k, v, beta, log_decay = linear_family.mask_tokens(mask, k, v, beta, log_decay)
    o = delta(self, q, k, v, beta, log_decay, causal=self.causal, decode=decode, chunk_size=self.chunk_size,
              impl=self.impl, segment_ids=segment_ids)
    return linear_family.OutputPath(norm=True, gate=self.output_gate, norm_eps=self.norm_eps, name="output", **kw)(
        o, x)


@register("delta_net")
class DeltaNet(DeltaRuleLayer):
  """S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = q_t^T S_t / sqrt(Dk) (Schlag et al. 2021; Yang
  et al. 2024's chunked training). Defaults as fla's DeltaNet: short convs on, no output gate, expand_k = expand_v
  = 1. dtype: computation (None: promote x and the parameters); param_dtype: the parameters'."""


@register("gated_delta_net")
class GatedDeltaNet(DeltaRuleLayer):
  """S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T with Mamba2's gate
  g_t = -exp(A_log) softplus(x W_a + dt_bias) per head (Gated DeltaNet, arXiv 2412.06464). Defaults as fla's
  GatedDeltaNet: swish output gate, expand_v = 2; A uniform in a_init_range, dt log-uniform in [dt_min, dt_max]."""
  expand_v: float = 2.0
  output_gate: bool = True
  a_init_range: tuple = (1.0, 16.0)
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4

  def log_decay(self, x, kw):
    a_raw = common.projection(self.num_heads, ("embed", "heads"), name="gate_a", **kw)(x)
    heads = lambda init: nn.with_logical_partitioning(init, ("heads",))
    dt_bias = self.param("dt_bias", heads(dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor)),
                         (self.num_heads,), self.param_dtype)
    a_log = self.param("A_log", heads(a_log_init(*self.a_init_range)), (self.num_heads,), self.param_dtype)
    dt = jax.nn.softplus(a_raw.astype(jnp.float32) + dt_bias.astype(jnp.float32))
    return -jnp.exp(a_log.astype(jnp.float32)) * dt
