"""Causal language model: token embedding, optional positions, backbone, (tied) output head."""
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from mixers.layers.common import Dtype, constrain, projection
from mixers.layers.decode_cache import poison, segment_positions, within_capacity
from mixers.layers.positional import MdTpe
from mixers.models.backbone import SequenceModel, embed_init

POSITIONAL = (None, "learned", "md_tpe")


def check_positional(positional, positional_kwargs, max_len):
  """ValueError unless the positions of a language model are causal and sized: positional in `POSITIONAL`,
  "learned" with a positive max_len, "md_tpe" without positional_kwargs.causal=False."""
  if positional not in POSITIONAL:
    raise ValueError(f"positional must be one of {POSITIONAL}, got {positional!r}")
  if positional == "learned" and (not isinstance(max_len, int) or isinstance(max_len, bool) or max_len <= 0):
    raise ValueError(f"positional='learned' needs max_len, a positive int (the rows of the position table), "
                     f"got max_len={max_len!r}")
  if positional == "md_tpe" and not dict(positional_kwargs or {}).get("causal", True):
    raise ValueError("positional='md_tpe' in a language model must be causal: positional_kwargs.causal=False "
                     "would let a token read later ones")


class LanguageModel(nn.Module):
  """tokens `[B,T]` int -> logits `[B,T,vocab_size]` float32. Decodes through the `cache` collection.

  positional: None, "learned" (x + table[position], the position counted from each segment's first token, `max_len`
  rows) or "md_tpe" (x + MdTpe(causal=True, **positional_kwargs)(x)), added to the token embeddings.
  dtype: of the activations (None: float32); param_dtype: of the embedding and head (the backbone has its own).
  """
  vocab_size: int
  d_model: int
  backbone: SequenceModel
  tie_embeddings: bool = True
  positional: Optional[str] = None
  positional_kwargs: Mapping[str, Any] = None
  max_len: Optional[int] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, *, mask=None, decode=False, prefix_len=None, segment_ids=None):
    """logits `[B,T,vocab_size]` from tokens `[B,T]`; mask `[B,T]` (True at real tokens) or None.

    decode: continue from the `cache` collection: `init(key, tokens_full, decode=True)["cache"]` sizes it, then
    `apply({"params": p, "cache": cache}, tokens_chunk, decode=True, mutable=["cache"])` reads chunk by chunk
    (see `mixers.layers.decode_cache`). Learned positions continue the cache's count; past `max_len` a concrete
    position raises ValueError and a traced one (under jit) gives NaN logits.
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
    x = self._add_positions(x, mask=mask, decode=decode, segment_ids=segment_ids)
    x = self.backbone(x, mask=mask, decode=decode, prefix_len=prefix_len, **packed)
    if self.tie_embeddings:
      logits = embed.attend(x.astype(jnp.float32)).astype(jnp.float32) / jnp.sqrt(self.d_model)
    else:
      logits = projection(self.vocab_size, ("embed", "vocab"), name="head", dtype=jnp.float32,
                          param_dtype=self.param_dtype)(x.astype(jnp.float32))
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def _add_positions(self, x, *, mask, decode, segment_ids):
    """x `[B,T,d]` plus the positional layer's encoding (x itself without one)."""
    check_positional(self.positional, self.positional_kwargs, self.max_len)
    if self.positional == "md_tpe":
      kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, **dict(self.positional_kwargs or {}), "causal": True}
      return x + MdTpe(name="md_tpe", **kw)(x, mask=mask, decode=decode, segment_ids=segment_ids)
    if self.positional != "learned":
      return x
    pos, first = segment_positions(self, segment_ids, x.shape[0], x.shape[1], decode=decode)
    local = pos - first  # [B,T]: counted from each segment's first token
    ok = within_capacity(self, jnp.max(local) + 1, self.max_len, decode=decode, what=f"max_len={self.max_len}")
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
    table = self.param("position_embedding", init, (self.max_len, self.d_model), self.param_dtype)
    return poison(x + table[local].astype(x.dtype), ok)
