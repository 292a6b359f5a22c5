"""M2 sequence mixer (Monarch Mixer, arXiv 2310.12109): gated implicit long convolutions.

  x1, x2, v = shortconv(x W_in)                      three streams `[B,T,d]`
  y = W_out (x2 * (k * (x1 v) + D x1 v))             `*` a per-channel long convolution over time

k is an implicit (Hyena-style) filter: a small sine-activated MLP of positional features of the lag,
times an exponential decay window. Non-causal (M2-BERT): a second MLP gives the anti-causal side
k_rev and the short conv is centred. Causal (M2-GPT): one-sided filter, causal short conv, and
autoregressive decoding through a cache of past (gated) values.

Packed sequences (`segment_ids`): the short conv taps and the long convolution's pairs stay inside a segment; the
filter is indexed by the lag t - s, so each segment is convolved exactly as if it were its own sequence.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixers.layers.common import (Dtype, ShortConv, check_mask, check_segment_ids, check_x, compute_dtype, constrain,
                                  projection)
from mixers.layers.decode_cache import cached_recurrence, check_decode, poison, segment_positions, within_capacity
from mixers.ops import checks
from mixers.ops.long_conv import long_conv, long_conv_matrix
from mixers.registry import register


class ImplicitFilter(nn.Module):
  """Filter `[n, d]` at integer lags: `k[j] = MLP(z(j)) * exp(-|delta| j / length_scale)`.

  z(j) = [j/L, cos(2 pi f j / L), sin(2 pi f j / L)] for (emb_dim-1)/2 frequencies f (L = length_scale); the MLP
  is Dense-sin, `inner_layers` x (Dense-sin), Dense, with `sin(freq * .)` activations (one freq vector, learned,
  initialised to `sin_freq`), as Hyena's (num_inner_mlps=2). learn_positions: z is a `[L, emb_dim]` parameter
  initialised to those features (Hyena registers it as a parameter; Zoology's trainer trains it at the model's
  rate), so lags must be < L. Decay rates span `log(target)/fast_decay_pct .. log(target)/slow_decay_pct` across
  channels. Computed in float32 whatever the parameters' dtype (`param_dtype`): sines of large arguments need the
  precision.
  """
  features: int
  order: int = 64
  emb_dim: int = 5
  length_scale: int = 2048
  sin_freq: float = 1.0
  inner_layers: int = 2
  learn_positions: bool = False
  fast_decay_pct: float = 0.3
  slow_decay_pct: float = 1.5
  decay_target: float = 1e-2
  param_dtype: Dtype = jnp.float32

  def positional_features(self, lags):
    t = lags.astype(jnp.float32)[:, None] / self.length_scale
    bands = (self.emb_dim - 1) // 2
    f = jnp.linspace(1e-4, bands - 1, bands, dtype=jnp.float32)
    w = 2 * jnp.pi * t * f
    return t, jnp.concatenate([t, jnp.cos(w), jnp.sin(w)], axis=-1)

  @nn.compact
  def __call__(self, lags):
    if self.emb_dim < 3 or self.emb_dim % 2 == 0:
      raise ValueError(f"emb_dim must be odd and >= 3 (time, cosine and sine), got {self.emb_dim}")
    if self.inner_layers < 0:
      raise ValueError(f"inner_layers must be >= 0 (hidden layers of the filter's MLP), got {self.inner_layers}")
    if self.learn_positions and lags.shape[0] > self.length_scale:
      raise ValueError(f"learn_positions: a table of length_scale={self.length_scale} positions cannot give "
                       f"{lags.shape[0]} lags")
    t, z = self.positional_features(lags)
    if self.learn_positions:
      features = lambda _, shape, dtype: self.positional_features(jnp.arange(shape[0]))[1].astype(dtype)
      table = self.param("positions", nn.with_logical_partitioning(features, (None, None)),
                         (self.length_scale, self.emb_dim), self.param_dtype)
      z = jnp.take(table.astype(jnp.float32), lags, axis=0)
    freq = self.param("sin_freq", nn.with_logical_partitioning(
        nn.initializers.constant(self.sin_freq), (None,)), (self.order,), self.param_dtype)
    dense = dict(dtype=jnp.float32, param_dtype=self.param_dtype)
    h = z
    for i in range(1 + self.inner_layers):
      h = nn.Dense(self.order, name=f"dense_{i}", kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), (None, None)), **dense)(h)
      h = jnp.sin(freq.astype(jnp.float32) * h)
    h = nn.Dense(self.features, use_bias=False, name="dense_out", kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (None, "mlp")), **dense)(h)
    max_decay = np.log(self.decay_target) / self.fast_decay_pct
    min_decay = np.log(self.decay_target) / self.slow_decay_pct
    deltas = jnp.abs(jnp.linspace(min_decay, max_decay, self.features, dtype=jnp.float32))
    return h * jnp.exp(-t * deltas)


@register("m2")
class MonarchMixer(nn.Module):
  """M2 mixer: x `[B,T,d]` -> y `[B,T,d]`; any T (long convolutions in O(T log T)).

  causal (default True, as every causal-capable mixer): one-sided filter and causal short conv (decodes); False:
    bidirectional filter, centred conv (M2-BERT).
  max_len: length scale of the filter's positions, and the decode cache length (decoding past it raises, or gives
    NaN under jit). filter_order / emb_dim / sin_freq: the implicit filter's MLP width, number of
    positional features and sine frequency (1, as Zoology's Hyena: at 10, M2-BERT's value, which M2-BERT pairs
    with a 1e-3 filter learning rate, one Adam step at 1e-2 moves the filter by more than its own norm).
    filter_inner_layers: the MLP's hidden order x order layers (2, Hyena's num_inner_mlps).
    filter_learn_positions: the filter's positional features are a learned `[max_len, emb_dim]` table (initialised
    to the fixed features; T <= max_len), as Zoology trains Hyena's.
    short_width: the short conv's window.
  max_segments: the most segments a row of packed `segment_ids` holds (None: counted from concrete ids; required
    when they are traced, under jit). A packed long convolution costs max_segments plain ones (one row per segment);
    a row with more segments gives NaN.
  conv_impl: "fft" or "monarch" (GEMM-only DFT), see `mixers.ops.long_conv`; both take packed rows. dtype:
  computation (None: promote x and the parameters); param_dtype: the parameters', except the implicit filter's, which
  take filter_param_dtype (float32; None: param_dtype): they are few, and sin(sin_freq * .) amplifies their rounding
  (bfloat16 filter parameters alone move the output by about 4%). The filter and the long convolution run in float32.

  Decode (`decode=True`, causal): the cache holds every past gated value `x1 v` (the state, `[B, max_len, d]`),
  the position and the short conv's window; a step costs O(T) per token (the whole filter against the history),
  a chunk of c > 1 tokens one long convolution over the history plus one over the chunk. The history holds only
  each row's last segment (zeros before it), so decoding after a packed prefill continues that segment.
  """
  causal: bool = True
  max_len: int = 2048
  filter_order: int = 64
  emb_dim: int = 5
  sin_freq: float = 1.0
  filter_inner_layers: int = 2
  filter_learn_positions: bool = False
  short_width: int = 3
  max_segments: Optional[int] = None
  conv_impl: str = "fft"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  filter_param_dtype: Optional[Dtype] = jnp.float32

  supports_causal = True

  def __call__(self, x, *, mask=None, decode=False, segment_ids=None):
    """y `[B,T,d_model]` from x `[B,T,d_model]`.

    mask: `[B,T]` bool, True at real tokens (padded tokens leak into no real token), or None.
    decode: causal only; continue from the `cache` collection (the protocol: `mixers.layers.decode_cache`).
      At most `max_len` positions in all.
    segment_ids: `[B,T]` ints or None (packed sequences; a segment is a run of equal ids): each segment is mixed as
      its own sequence (short conv and long convolution restart at its first token). Under jit it needs the
      `max_segments` attribute. Decoding, the chunk's first segment continues the cache and later chunks continue
      the row's last segment.
    """
    return self._mix(x, mask, decode, matrix=False, segment_ids=segment_ids)

  def mixing_matrix(self, x, *, mask=None):
    """`(M, v)`: M `[B,d,T,T]` per channel, `M[b,c,t,s] = x2[t] (k[t-s] + D [t=s]) x1[s]` (k_rev above
    the diagonal), and the value stream v `[B,T,d]` it mixes: `y = out_proj(einsum("bcts,bsc->btc", M, v))`."""
    return self._mix(x, mask, False, matrix=True)

  def _filters(self, t, d):
    kw = dict(features=d, order=self.filter_order, emb_dim=self.emb_dim, length_scale=self.max_len,
              sin_freq=self.sin_freq, inner_layers=self.filter_inner_layers,
              learn_positions=self.filter_learn_positions, param_dtype=self.filter_param_dtype or self.param_dtype)
    lags = jnp.arange(t)
    k = ImplicitFilter(**kw, name="filter")(lags)
    k_rev = None if self.causal else ImplicitFilter(**kw, name="filter_rev")(lags)
    return k, k_rev

  def _segments(self, segment_ids, shape):
    """segment_ids `[B,T]` checked against x's `shape` (as a jnp array, or None); ValueError when they are traced
    (under jit) and the max_segments attribute, which the packed long convolution then needs, is not set."""
    segment_ids = check_segment_ids(self, segment_ids, shape)
    if segment_ids is not None and self.max_segments is None and not checks.is_concrete(segment_ids):
      raise ValueError(f"{type(self).__name__}: segment_ids under jit (traced) need max_segments, the most segments "
                       f"a row holds: build the layer with max_segments=<int>")
    return segment_ids

  @nn.compact
  def _mix(self, x, mask, decode, matrix, segment_ids=None):
    check_x(self, x)
    check_decode(self, decode)
    b, t, d = x.shape
    mask = check_mask(mask, x.shape)
    segment_ids = self._segments(segment_ids, x.shape)
    dtype = compute_dtype(self.dtype, x, self.param_dtype)
    kw = dict(dtype=dtype, param_dtype=self.param_dtype)
    u = projection(3 * d, ("embed", "mlp"), use_bias=True, name="in_proj", **kw)(x)
    u = ShortConv(width=self.short_width, causal=self.causal, activation=None, channel_axis="mlp",
                  name="short_conv", **kw)(u, mask=mask, decode=decode, segment_ids=segment_ids)
    x1, x2, v = jnp.split(u, 3, axis=-1)
    gated = x1 * v
    if mask is not None:
      gated = gated * mask[..., None].astype(gated.dtype)
    skip = self.param("skip", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("mlp",)), (d,),
                      self.param_dtype).astype(jnp.float32)

    if matrix:
      k, k_rev = self._filters(t, d)
      M = long_conv_matrix(k, k_rev) + jnp.eye(t)[None] * skip[:, None, None]
      M = jnp.swapaxes(x2, 1, 2)[..., :, None] * M[None] * jnp.swapaxes(x1, 1, 2)[..., None, :]
      if mask is not None:
        M = M * mask[:, None, None, :]
      return M, v

    pos, first = segment_positions(self, segment_ids, b, t, decode=decode)
    start = pos[0, 0]
    ok = within_capacity(self, start + t, self.max_len, decode=True, what=f"max_len={self.max_len}") if decode else None
    packed = dict(impl=self.conv_impl, segment_ids=segment_ids, max_segments=self.max_segments)

    def convolve(history):
      if history is None:
        k, k_rev = self._filters(t, d)
        return long_conv(gated.astype(jnp.float32), k, k_rev=k_rev, **packed), None
      return self._decode_conv(history, start, first, gated, packed)

    y = cached_recurrence(self, convolve, lambda: jnp.zeros((b, self.max_len, d), jnp.float32), decode=decode)
    if ok is not None:
      y = poison(y, ok)
    y = (y + skip * gated.astype(jnp.float32)).astype(dtype) * x2
    return constrain(projection(d, ("mlp", "embed"), use_bias=True, name="out_proj", **kw)(y))

  def _decode_conv(self, history, start, first, gated, packed):
    """(long convolution of a chunk starting at `start` against the history `[B,max_len,d]`, updated history).

    The history holds the gated values of each row's last segment, zeros elsewhere; first `[B,c]`: the position of
    each chunk token's segment's first token. Kept: the chunk written in, zeroed before its last segment.
    """
    c, d = gated.shape[1:]
    gated = gated.astype(jnp.float32)
    hist = jax.lax.dynamic_update_slice(history, gated, (0, start, 0))
    k, _ = self._filters(self.max_len, d)
    if c == 1:  # y_t = sum_{s <= t} k[t-s] h_s: one pass over the filter and the history
      lag = start - jnp.arange(self.max_len)
      taps = jnp.where((lag >= 0)[:, None], k[jnp.clip(lag, 0, self.max_len - 1)], 0.0)
      y = jnp.einsum("sd,bsd->bd", taps, hist)[:, None]
    else:  # the history before the chunk reaches the tokens that continue its segment; then the chunk, packed
      past = jax.lax.dynamic_slice_in_dim(long_conv(history, k, impl=self.conv_impl), start, c, axis=1)
      y = past * (first <= start)[..., None] + long_conv(gated, k[:c], **packed)
    keep = jnp.arange(self.max_len)[None, :] >= first[:, -1:]  # the row's last segment
    return y, hist * keep[..., None]
