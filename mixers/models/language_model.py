"""Causal language model: token embedding, backbone, (tied) output head."""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from mixers.layers.common import Dtype, constrain, projection
from mixers.models.backbone import SequenceModel, embed_init


class LanguageModel(nn.Module):
  """tokens `[B,T]` int -> logits `[B,T,vocab_size]` float32. Decodes through the `cache` collection.

  dtype: of the activations (None: float32); param_dtype: of the embedding and head (the backbone has its own).
  """
  vocab_size: int
  d_model: int
  backbone: SequenceModel
  tie_embeddings: bool = True
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, *, mask=None, decode=False, prefix_len=None, segment_ids=None):
    """logits `[B,T,vocab_size]` from tokens `[B,T]`; mask `[B,T]` (True at real tokens) or None.

    decode: continue from the `cache` collection: `init(key, tokens_full, decode=True)["cache"]` sizes it, then
    `apply({"params": p, "cache": cache}, tokens_chunk, decode=True, mutable=["cache"])` reads chunk by chunk
    (see `mixers.layers.decode_cache`).
    prefix_len: None, int or `[B]` ints (Prefix-LM, JRT): the first prefix_len tokens read each other in every
    layer, later tokens everything before them; every mixer must take it (`backbone.takes_prefix_len`). To read a
    prompt bidirectionally and generate causally, give it to the decode call that reads the prompt only.
    segment_ids: None or `[B,T]` ints (packed sequences; a segment is a run of equal ids): each segment is modelled
    as its own sequence in every layer (`backbone.takes_segment_ids`); decoding after a packed prompt, each row
    continues its last segment.
    """
    if tokens.ndim != 2:
      raise ValueError(f"tokens must have shape [B,T], got {tuple(tokens.shape)}")
    embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=embed_init(), param_dtype=self.param_dtype,
                     name="embed")
    x = constrain(embed(tokens).astype(self.dtype or jnp.float32))
    packed = {} if segment_ids is None else {"segment_ids": segment_ids}
    x = self.backbone(x, mask=mask, decode=decode, prefix_len=prefix_len, **packed)
    if self.tie_embeddings:
      logits = embed.attend(x.astype(jnp.float32)).astype(jnp.float32) / jnp.sqrt(self.d_model)
    else:
      logits = projection(self.vocab_size, ("embed", "vocab"), name="head", dtype=jnp.float32,
                          param_dtype=self.param_dtype)(x.astype(jnp.float32))
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
