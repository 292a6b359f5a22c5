"""Sequence / image classifier: token or patch embedding, optional positions, backbone, pooling, head.

Pools: "mean" (over the real tokens), "cls" (a learned class token before the sequence, read at position 0) and
"last_token" (a learned class token after the sequence, read at its own position: in a causal backbone it is the
one position that sees every patch or token, which makes a causal mixer an image classifier).
"""
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from mixers.layers.common import Dtype, constrain, projection
from mixers.layers.positional import MdTpe
from mixers.models.backbone import SequenceModel, embed_init

POOLS = ("mean", "cls", "last_token")
POSITIONAL = (None, "learned", "md_tpe")


def insert_after_last(x, token, mask=None):
  """(x', mask', at): token `[B,1,d]` inserted into x `[B,T,d]` right after each row's last real token.

  x' `[B,T+1,d]`: `x'_t = x_t` for t < at, `x'_at = token`, `x'_t = x_{t-1}` for t > at; mask' `[B,T+1]` is mask
  with True inserted at `at` (None stays None); at `[B]` int32 is one past the row's last True of mask `[B,T]`
  (T for every row without a mask). In a right-padded row the token thus ends the real tokens, so padded and
  unpadded inputs see the same sequence up to and including the token.
  """
  b, t, d = x.shape
  if token.shape != (b, 1, d):
    raise ValueError(f"token must have shape [B,1,d] = {(b, 1, d)}, got {tuple(token.shape)}")
  if mask is None:
    return jnp.concatenate([x, token], axis=1), None, jnp.full((b,), t, jnp.int32)
  if mask.shape != (b, t):
    raise ValueError(f"mask must have shape [B,T] = {(b, t)}, got {tuple(mask.shape)}")
  mask = mask.astype(bool)
  pos = jnp.arange(t + 1)
  at = jnp.max(jnp.where(mask, pos[1:], 0), axis=1).astype(jnp.int32)
  before, here = pos < at[:, None], pos == at[:, None]
  x_before = jnp.concatenate([x, x[:, -1:]], axis=1)
  x_after = jnp.concatenate([x[:, :1], x], axis=1)
  x = jnp.where(before[..., None], x_before, jnp.where(here[..., None], token, x_after))
  mask = jnp.where(before, jnp.concatenate([mask, jnp.zeros((b, 1), bool)], axis=1), here)
  return x, mask, at


class PatchEmbed(nn.Module):
  """image `[B,H,W,C]` (uint8 or float) -> patches `[B,H/p,W/p,d_model]` through a stride-p convolution."""
  d_model: int
  patch_size: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image):
    if image.ndim != 4:
      raise ValueError(f"image must have shape [B,H,W,C], got {tuple(image.shape)}")
    p = self.patch_size
    if image.shape[1] % p or image.shape[2] % p:
      raise ValueError(f"patch_size={p} must divide the image size {tuple(image.shape[1:3])}")
    x = image.astype(jnp.float32)
    if jnp.issubdtype(image.dtype, jnp.integer):
      x = x / 127.5 - 1.0
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "embed"))
    return nn.Conv(self.d_model, (p, p), strides=(p, p), padding="VALID", name="conv", param_dtype=self.param_dtype,
                   kernel_init=init)(x)


class Classifier(nn.Module):
  """inputs (tokens `[B,T]` int, or an image `[B,H,W,C]`) -> logits `[B,num_classes]` float32.

  pool: "mean" over the real tokens; "cls" reads a learned token put before the sequence; "last_token" reads a
  learned token put right after each row's last real token (`insert_after_last`), so that a causal backbone's
  class token sees every token. Positions ("learned", "md_tpe") are added to the patches or tokens only, never
  to the class token. With a class token n-D mixers cannot read the patch grid (one token more than the grid).
  dtype: of the activations (None: float32); param_dtype: of the embeddings and head (the backbone has its own).
  """
  num_classes: int
  d_model: int
  backbone: SequenceModel
  vocab_size: Optional[int] = None
  patch_size: Optional[int] = None
  pool: str = "mean"
  positional: Optional[str] = None
  positional_kwargs: Mapping[str, Any] = None
  max_len: int = 4096
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs, *, mask=None):
    """logits `[B,num_classes]` from tokens `[B,T]` or an image `[B,H,W,C]`; mask `[B,T]` (True at real tokens)."""
    if self.pool not in POOLS:
      raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
    if self.positional not in POSITIONAL:
      raise ValueError(f"positional must be one of {POSITIONAL}, got {self.positional!r}")
    if self.patch_size:
      grid = PatchEmbed(self.d_model, self.patch_size, self.param_dtype, name="patch_embed")(inputs)
      grid_shape = grid.shape[1:3]
      x = grid.reshape(grid.shape[0], -1, self.d_model)
    else:
      if inputs.ndim != 2:
        raise ValueError(f"tokens must have shape [B,T], got {tuple(inputs.shape)}")
      x = nn.Embed(self.vocab_size, self.d_model, embedding_init=embed_init(), param_dtype=self.param_dtype,
                   name="embed")(inputs)
      grid_shape = None
    x = x.astype(self.dtype or jnp.float32)
    if self.positional == "learned":
      init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
      pos = self.param("position_embedding", init, (self.max_len, self.d_model), self.param_dtype)
      x = x + pos[: x.shape[1]].astype(x.dtype)
    elif self.positional == "md_tpe":
      kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, **dict(self.positional_kwargs or {}))
      x = x + MdTpe(grid_shape=grid_shape, name="md_tpe", **kw)(x, mask=mask)
    if self.pool in ("cls", "last_token"):
      # A zero token after the patches starts dead in the linear-attention family (a zero query reads nothing, so
      # at the first step only the token itself gets a gradient); it starts at the token embeddings' scale.
      init = nn.initializers.zeros if self.pool == "cls" else nn.initializers.normal(1.0)
      cls = self.param("cls", nn.with_logical_partitioning(init, ("embed",)), (self.d_model,), self.param_dtype)
      token = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.d_model))
    if self.pool == "cls":
      x = jnp.concatenate([token, x], axis=1)
      if mask is not None:
        mask = jnp.concatenate([jnp.ones((mask.shape[0], 1), bool), mask], axis=1)
    elif self.pool == "last_token":
      x, mask, at = insert_after_last(x, token, mask)
    x = self.backbone(constrain(x), mask=mask)
    if self.pool == "cls":
      pooled = x[:, 0]
    elif self.pool == "last_token":
      pooled = jnp.take_along_axis(x, at[:, None, None], axis=1)[:, 0]
    elif mask is None:
      pooled = x.mean(axis=1)
    else:
      w = mask.astype(x.dtype)[..., None]
      pooled = (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1)
    return projection(self.num_classes, ("embed", None), name="head", dtype=jnp.float32,
                      param_dtype=self.param_dtype)(pooled.astype(jnp.float32))
