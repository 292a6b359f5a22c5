"""The backbone: pre-norm residual blocks of a sequence mixer and a channel mixer, then a final RMSNorm.

Layers run one after another, or (`scan_layers=True`) as one `nn.scan` over a group of blocks: the group is the
shortest repeating pattern of the layers' mixers (one block for a plain model, two for `gla,attention`), its
parameters gain a leading axis (logical name `layers`) and the program compiles the group once.
"""
import inspect
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers import registry
from mixers.layers.common import Dtype, RMSNorm, constrain

REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def mixer_kwargs(name, kwargs, *, causal=None, dtype=None, param_dtype=None, grid_shape=None, max_len=None):
  """kwargs for mixer `name`, with causal / dtype / param_dtype / grid_shape / max_len filled in where the mixer has
  those fields (values already in kwargs win)."""
  fields = registry.get(name).__dataclass_fields__
  kwargs = dict(kwargs)
  for key, value in (("causal", causal), ("dtype", dtype), ("param_dtype", param_dtype), ("max_len", max_len),
                     ("grid_shape", None if grid_shape is None else tuple(grid_shape))):
    if value is not None and key in fields:
      kwargs.setdefault(key, value)
  return kwargs


def takes_keyword(name, keyword):
  """Whether the sequence mixer `name` reads `keyword` (such as prefix_len or segment_ids) at call time."""
  return keyword in inspect.signature(registry.get(name, "sequence").__call__).parameters


def takes_prefix_len(name):
  """Whether the sequence mixer `name` reads `prefix_len` (Prefix-LM) at call time."""
  return takes_keyword(name, "prefix_len")


def takes_segment_ids(name):
  """Whether the sequence mixer `name` reads `segment_ids` (packed sequences) at call time."""
  return takes_keyword(name, "segment_ids")


def check_mixers_take(mixers, keyword, value, what):
  """ValueError when `value` is given as `keyword` to a model with a mixer that cannot read it, listing those that
  can (`what` names the feature in the message)."""
  if value is None:
    return
  bad = sorted({n for n in mixers if not takes_keyword(n, keyword)})
  if bad:
    able = [n for n in registry.names("sequence") if takes_keyword(n, keyword)]
    raise ValueError(f"{keyword} ({what}) reaches every layer, but mixer(s) {bad} do not take it; mixers that do: "
                     f"{', '.join(able) or 'none'}")


def remat_policy(name):
  """The `jax.checkpoint` policy called `name` (None or "" saves nothing); ValueError lists the valid names."""
  if not name:
    return None
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat_policy must be one of {', '.join(REMAT_POLICIES)} (or empty), got {name!r}")
  return REMAT_POLICIES[name]


class Block(nn.Module):
  """x + mixer(norm(x)), then x + channel(norm(x)); x `[B,T,d_model]`.

  dtype / param_dtype apply to the norms and fill the mixers' own when their kwargs do not set them.
  """
  mixer: str
  mixer_kwargs: Mapping[str, Any]
  channel_mixer: Optional[str]
  channel_kwargs: Mapping[str, Any]
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, decode=False, prefix_len=None, segment_ids=None):
    """x `[B,T,d_model]` -> same; mask `[B,T]` (True at real tokens) or None; decode, prefix_len, segment_ids
    (`[B,T]` ints, packed sequences): see the mixers."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mixer_kw = mixer_kwargs(self.mixer, self.mixer_kwargs, **kw)
    mixer = registry.get(self.mixer, "sequence")(name="mixer", **mixer_kw)
    patterns = {key: val for key, val in (("prefix_len", prefix_len), ("segment_ids", segment_ids)) if val is not None}
    x = constrain(x + mixer(RMSNorm(name="mixer_norm", **kw)(x), mask=mask, decode=decode, **patterns))
    if self.channel_mixer:
      channel_kw = mixer_kwargs(self.channel_mixer, self.channel_kwargs, **kw)
      channel = registry.get(self.channel_mixer, "channel")(name="channel", **channel_kw)
      x = constrain(x + channel(RMSNorm(name="channel_norm", **kw)(x)))
    return x


class BlockGroup(nn.Module):
  """Blocks `block_0..block_{p-1}` in a row: the body that `nn.scan` repeats (returns `(x, None)`)."""
  mixers: Sequence[str]
  mixer_kwargs: Sequence[Mapping[str, Any]]
  channel_mixer: Optional[str]
  channel_kwargs: Mapping[str, Any]
  decode: bool = False
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, prefix_len, segment_ids):
    for j, (name, kwargs) in enumerate(zip(self.mixers, self.mixer_kwargs)):
      x = Block(name, kwargs, self.channel_mixer, self.channel_kwargs, self.dtype, self.param_dtype,
                name=f"block_{j}")(x, mask, self.decode, prefix_len, segment_ids)
    return x, None


def layer_period(mixers, kwargs):
  """The shortest p dividing the layer count with layer i equal to layer i % p (mixer and kwargs)."""
  n = len(mixers)
  for p in range(1, n + 1):
    if n % p == 0 and all(mixers[i] == mixers[i % p] and kwargs[i] == kwargs[i % p] for i in range(n)):
      return p
  return n


class SequenceModel(nn.Module):
  """`num_layers` blocks; `mixers[i]` names layer i's sequence mixer (a hybrid when they differ).

  remat: rematerialise each block (or scanned group) in the backward pass, saving what `remat_policy` names
  (`REMAT_POLICIES`; empty: nothing). scan_layers: run the layers as one `nn.scan` over the repeating group (see
  the module docstring); parameters then live under `layers/block_j` with a leading axis of num_layers / period
  (`stack_layers` and `unstack_layers` convert between the two layouts). dtype: computation (None: promote);
  param_dtype: the parameters' (both also fill the mixers' own where their kwargs do not set them).
  """
  mixers: Sequence[str]
  mixer_kwargs: Sequence[Mapping[str, Any]]
  channel_mixer: Optional[str] = "glu"
  channel_kwargs: Mapping[str, Any] = None
  remat: bool = False
  scan_layers: bool = False
  remat_policy: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, mask=None, decode=False, prefix_len=None, segment_ids=None):
    """x `[B,T,d_model]` -> same; mask `[B,T]` (True at real tokens) or None; decode: continue from the cache.

    prefix_len: None, int or `[B]` ints (Prefix-LM): passed to every layer's mixer, which must take it
    (`takes_prefix_len`); decoding, a prompt read with it fills the caches and later chunks go on causally.
    segment_ids: None or `[B,T]` ints (packed sequences; a segment is a run of equal ids): passed to every layer's
    mixer, which must take them (`takes_segment_ids`); each segment is computed as its own sequence. Decoding, give
    them to the chunk that reads the packed prompt: each row then continues its last segment.
    """
    if len(self.mixers) != len(self.mixer_kwargs):
      raise ValueError(f"{len(self.mixers)} mixers but {len(self.mixer_kwargs)} mixer_kwargs")
    check_mixers_take(self.mixers, "prefix_len", prefix_len, "Prefix-LM")
    check_mixers_take(self.mixers, "segment_ids", segment_ids, "packed sequences")
    if segment_ids is not None:
      segment_ids = jnp.asarray(segment_ids)
      if (x.ndim != 3 or segment_ids.shape != x.shape[:2] or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"segment_ids must be an int array [B,T] = {tuple(x.shape[:2])} for x {tuple(x.shape)}, "
                         f"got {segment_ids.dtype} of shape {tuple(segment_ids.shape)}")
    policy = remat_policy(self.remat_policy)
    channel_kwargs = dict(self.channel_kwargs or {})
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan_layers:
      x = self._scanned(x, mask, decode, prefix_len, segment_ids, policy, channel_kwargs, kw)
    else:
      block = nn.remat(Block, static_argnums=(3,), policy=policy) if self.remat else Block
      for i, (name, kwargs) in enumerate(zip(self.mixers, self.mixer_kwargs)):
        x = block(name, kwargs, self.channel_mixer, channel_kwargs, name=f"block_{i}", **kw)(x, mask, decode,
                                                                                              prefix_len, segment_ids)
    return RMSNorm(name="final_norm", **kw)(x)

  def _scanned(self, x, mask, decode, prefix_len, segment_ids, policy, channel_kwargs, kw):
    period = layer_period(self.mixers, self.mixer_kwargs)
    body = nn.remat(BlockGroup, policy=policy, prevent_cse=False) if self.remat else BlockGroup
    scan = nn.scan(body, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=len(self.mixers) // period,
                   metadata_params={nn.PARTITION_NAME: "layers"})
    group = scan(tuple(self.mixers[:period]), tuple(self.mixer_kwargs[:period]), self.channel_mixer, channel_kwargs,
                 decode, name="layers", **kw)
    return group(x, mask, prefix_len, segment_ids)[0]


def stack_layers(params, num_layers, period=1):
  """Unscanned backbone params (`block_i`, unboxed) -> the scanned layout (`layers/block_j` stacked over groups)."""
  groups = num_layers // period
  blocks = {f"block_{j}": jax.tree.map(lambda *a: jnp.stack(a),
                                       *[params[f"block_{g * period + j}"] for g in range(groups)])
            for j in range(period)}
  rest = {k: v for k, v in params.items() if not k.startswith("block_")}
  return {**rest, "layers": blocks}


def unstack_layers(params, period=1):
  """Scanned backbone params (`layers/block_j`, unboxed) -> the unscanned layout (`block_i`)."""
  groups = jax.tree.leaves(params["layers"])[0].shape[0]
  out = {k: v for k, v in params.items() if k != "layers"}
  for g in range(groups):
    for j in range(period):
      out[f"block_{g * period + j}"] = jax.tree.map(lambda a: a[g], params["layers"][f"block_{j}"])
  return out


def embed_init():
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed"))


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, None: None, "": None}


def compute_dtype(name):
  """The dtype a config names ("float32", "bfloat16", "float16"; None or "" for None)."""
  if name not in DTYPES:
    raise ValueError(f"dtype must be one of float32, bfloat16, float16 (or empty), got {name!r}")
  return DTYPES[name]
