"""Causal language model: token embedding, backbone, (tied) output head."""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from mixers.layers.common import constrain, projection
from mixers.models.backbone import SequenceModel, embed_init


class LanguageModel(nn.Module):
  """tokens `[B,T]` int -> logits `[B,T,vocab_size]` float32. Decodes through the `cache` collection."""
  vocab_size: int
  d_model: int
  backbone: SequenceModel
  tie_embeddings: bool = True
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, tokens, *, mask=None, decode=False):
    if tokens.ndim != 2:
      raise ValueError(f"tokens must have shape [B,T], got {tuple(tokens.shape)}")
    embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=embed_init(), name="embed")
    x = constrain(embed(tokens).astype(self.dtype or jnp.float32))
    x = self.backbone(x, mask=mask, decode=decode)
    if self.tie_embeddings:
      logits = embed.attend(x.astype(jnp.float32)) / jnp.sqrt(self.d_model)
    else:
      logits = projection(self.vocab_size, ("embed", "vocab"), name="head")(x.astype(jnp.float32))
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
