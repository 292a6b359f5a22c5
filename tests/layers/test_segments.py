"""Packed sequences through the layers and models: with `segment_ids`, each segment equals that segment run alone
(short convs, rotary and cosFormer positions, decode caches included)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixers
from mixers import registry
from mixers.models.backbone import SequenceModel, stack_layers, takes_segment_ids
from mixers.models.language_model import LanguageModel
from tests.conftest import assert_close, random_variables

D = 16
# one-token segments; row 1 repeats an id in three segments and ends in a segment shorter than the conv windows;
# with chunk_size 9 segments start at chunk edges and inside chunks. Two segment lengths: the segments run alone in
# two batches.
LENGTHS = ((9, 1, 9, 1, 9), (9, 9, 1, 9, 1))
IDS = np.stack([np.repeat([0, 1, 2, 3, 4], LENGTHS[0]), np.repeat([3, 5, 3, 7, 3], LENGTHS[1])]).astype(np.int32)
B, T = IDS.shape
MASK = np.ones((B, T), bool)
MASK[0, 7:9] = False  # the first segment of row 0 ends in two padded tokens
STEPS = 3  # decoded tokens after the packed prefill

CONFIGS = {  # tiny configs
    "attention": dict(num_heads=2),
    "linear_attention": dict(num_heads=2, feature_map="cosformer", short_conv=True, conv_width=3, chunk_size=9),
    "retention": dict(num_heads=2, chunk_size=9),
    "gla": dict(num_heads=2, gate_rank=4, short_conv=True, conv_width=3, chunk_size=9),
    "mamba2": dict(head_dim=8, state_dim=8, conv_width=4, chunk_size=9),
    "hydra": dict(head_dim=8, state_dim=8, conv_width=5, chunk_size=9),
    "vssd": dict(head_dim=8, state_dim=8, conv_width=3, chunk_size=9),
    "delta_net": dict(num_heads=2, conv_width=3, chunk_size=9),
    "gated_delta_net": dict(num_heads=2, conv_width=3, chunk_size=9),
    "lightnet": dict(num_heads=2, gate_rank=4, chunk_size=9),
    # max_len: the decode cache holds the prefill and the decoded tokens; max_segments: IDS's rows hold 5
    "m2": dict(max_len=T + STEPS, max_segments=5, filter_order=8),
    # LSH blocks of 4 and sampled columns covering every key: the approximation's paths, exact
    "hyper_attention": dict(num_heads=2, block_size=4, sample_size=T, min_seq_len=8, lsh_num_projs=3),
}
PACKABLE = [n for n in registry.names("sequence") if takes_segment_ids(n)]
CAUSAL = [n for n in PACKABLE if registry.is_causal_capable(n)]
# delta_net's non-causal path is gated_delta_net's without the decay
CASES = [(n, True) for n in CAUSAL] + [(n, False) for n in PACKABLE if n != "delta_net"]


def segments(row):
  edges = np.cumsum((0,) + LENGTHS[row])
  return list(zip(edges[:-1], edges[1:]))


def alone(apply, inputs, *masks, causal=False):
  """`apply(segments, *mask segments)` on every segment of IDS run alone, put back in place: `[B,T,...]`.

  One batch per segment length; `causal`: one batch of all segments, each followed by the tokens after it up to
  the longest segment's length (a causal layer's outputs on a segment do not read them).
  """
  where = {}
  for b in range(B):
    for s, e in segments(b):
      where.setdefault(max(LENGTHS[0] + LENGTHS[1]) if causal else e - s, []).append((b, s, e))
  out = {}
  for n, places in where.items():
    cut = lambda a: jnp.stack([jnp.pad(a[b], [(0, n)] + [(0, 0)] * (a.ndim - 2), constant_values=1)[s:s + n]
                               for b, s, _ in places])
    y = apply(cut(inputs), *map(cut, masks))
    out.update({(b, s): y[i, :e - s] for i, (b, s, e) in enumerate(places)})
  return jnp.stack([jnp.concatenate([out[b, s] for s, _ in segments(b)]) for b in range(B)])


def build(name, causal):
  return mixers.build_mixer(name, causal=causal, **CONFIGS[name])


def empty_cache(layer, variables, x_full):
  """The cache `layer.init(key, x_full, decode=True)` makes (zeros, and the capacity of a bounded cache), without
  compiling the init."""
  shapes = jax.eval_shape(lambda: layer.apply(variables, x_full, decode=True, mutable=["cache"])[1]["cache"])
  capacity = lambda path: getattr(path[-1], "key", None) == "capacity"
  fill = lambda path, a: jnp.full(a.shape, x_full.shape[1] if capacity(path) else 0, a.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


SIDED = ("m2",)  # mixers whose non-causal form has parameters of its own (m2's anti-causal filter)


@functools.lru_cache(maxsize=None)
def parameters(name, causal):
  """One set of parameters per mixer (and side, for SIDED), shared by its tests."""
  return random_variables(build(name, causal), jnp.zeros((B, T, D)))


def init(name, causal):
  """(layer, its variables)."""
  causal = causal if name in SIDED else registry.is_causal_capable(name)
  return build(name, causal), parameters(name, causal)


def test_every_mixer_is_packable():
  assert PACKABLE == registry.names("sequence") and sorted(CONFIGS) == PACKABLE


@pytest.mark.parametrize("name,causal", CASES)
def test_packed_layer_equals_segments_alone(name, causal):
  layer, variables = init(name, causal)
  x = jax.random.normal(jax.random.key(0), (B, T, D))

  @jax.jit
  def packed_and_alone(variables, x, ids, mask):
    packed = layer.apply(variables, x, segment_ids=ids, mask=mask)
    return packed, alone(lambda x, mask: layer.apply(variables, x, mask=mask), x, mask, causal=causal)

  packed, expected = packed_and_alone(variables, x, jnp.asarray(IDS), jnp.asarray(MASK))
  assert_close(packed, expected, 1e-5, f"{name} causal={causal} packed vs alone")


@pytest.mark.parametrize("name", CAUSAL)
def test_decode_after_packed_prefill(name):
  """A packed prefill, then STEPS single tokens: each row continues its last segment (for attention, the cache
  shows a row's later tokens only its last segment's keys)."""
  layer, variables = init(name, True)
  x = jax.random.normal(jax.random.key(2), (B, T + STEPS, D))

  @jax.jit
  def decode_and_alone(variables, x, ids):
    def step(cache, chunk, **kw):
      y, state = layer.apply({**variables, "cache": cache}, chunk, decode=True, mutable=["cache"], **kw)
      return state["cache"], y

    cache, prefill = step(empty_cache(layer, variables, x), x[:, :T], segment_ids=ids)
    _, steps = jax.lax.scan(lambda c, xt: step(c, xt[:, None]), cache, jnp.swapaxes(x[:, T:], 0, 1))
    decoded = jnp.concatenate([prefill, jnp.swapaxes(steps[:, :, 0], 0, 1)], axis=1)
    forward = layer.apply(variables, x[:, :T], segment_ids=ids) if name == "attention" else prefill
    starts = [segments(b)[-1][0] for b in range(B)]
    n = max(T + STEPS - s for s in starts)  # the last segments and the decoded tokens alone, right-padded
    last = layer.apply(variables, jnp.stack([jnp.pad(x[b, s:], ((0, n - (T + STEPS - s)), (0, 0)))
                                             for b, s in enumerate(starts)]))
    return (prefill, forward, [decoded[b, s:] for b, s in enumerate(starts)],
            [last[b, :T + STEPS - s] for b, s in enumerate(starts)])

  prefill, forward, decoded, last = decode_and_alone(variables, x, jnp.asarray(IDS))
  assert_close(prefill, forward, 1e-5, f"{name} packed prefill vs packed forward")
  for b in range(B):
    assert_close(decoded[b], last[b], 1e-5, f"{name} row {b}: last segment + decoded tokens vs alone")


MODEL_MIXERS = ("linear_attention", "attention")
MODEL_KW = ({"num_heads": 2, "short_conv": True, "conv_width": 3, "chunk_size": 9}, {"num_heads": 2})


def language_model(**kw):
  backbone = SequenceModel(mixers=MODEL_MIXERS, mixer_kwargs=MODEL_KW, channel_kwargs={"expansion": 2.0}, **kw)
  return LanguageModel(vocab_size=11, d_model=D, backbone=backbone)


def test_models_packed_equal_segments_alone():
  """A LanguageModel (through its SequenceModel) on packed tokens equals the segments alone on the plain path;
  the remat and scanned paths equal the plain one."""
  plain, remat, scanned = language_model(), language_model(remat=True), language_model(scan_layers=True)
  tokens = jax.random.randint(jax.random.key(6), (B, T), 0, 11)
  params = nn.unbox(random_variables(plain, tokens)["params"])
  stacked = {**params, "backbone": stack_layers(params["backbone"], len(MODEL_MIXERS), period=len(MODEL_MIXERS))}

  @jax.jit
  def run(tokens, ids):
    apply = lambda t, **kw: plain.apply({"params": params}, t, **kw)
    return (apply(tokens, segment_ids=ids), alone(apply, tokens, causal=True),
            remat.apply({"params": params}, tokens, segment_ids=ids),
            scanned.apply({"params": stacked}, tokens, segment_ids=ids))

  packed, expected, packed_remat, packed_scanned = run(tokens, jnp.asarray(IDS))
  assert_close(packed, expected, 1e-5, "packed vs alone")
  assert_close(packed_remat, packed, 1e-6, "remat vs plain")
  assert_close(packed_scanned, packed, 1e-6, "scanned vs plain")


class Unpacked(nn.Module):
  """A sequence mixer without segment_ids (every registered one takes them)."""
  causal: bool = True

  def __call__(self, x, *, mask=None, decode=False):
    return x


def test_model_with_a_mixer_that_cannot_take_segment_ids(monkeypatch):
  monkeypatch.setitem(registry._REGISTRY["sequence"], "unpacked", Unpacked)  # pylint: disable=protected-access
  model = SequenceModel(mixers=("gla", "unpacked"), mixer_kwargs=({"num_heads": 2}, {}))
  x = jnp.zeros((B, T, D))
  with pytest.raises(ValueError, match=r"segment_ids.*\['unpacked'\].*mixers that do: attention, delta_net.*, "
                                       r"hyper_attention, .*, m2, mamba2, retention, vssd"):
    model.init(jax.random.key(0), x, segment_ids=jnp.asarray(IDS))


def test_bad_segment_ids():
  x = jnp.zeros((B, T, D))
  layer, variables = init("gla", True)
  for bad in (jnp.zeros((B, T - 1), jnp.int32), jnp.zeros((T,), jnp.int32), jnp.zeros((B, T), jnp.float32)):
    with pytest.raises(ValueError, match="segment_ids"):
      layer.apply(variables, x, segment_ids=bad)
    with pytest.raises(ValueError, match="segment_ids"):
      language_model().backbone.init(jax.random.key(0), x, segment_ids=bad)
  with pytest.raises(ValueError, match="segment_ids .* cannot be combined with prefix_len"):
    layer.apply(variables, x, segment_ids=jnp.asarray(IDS), prefix_len=3)
  vssd = mixers.build_mixer("vssd", grid_shape=(T, 1), **CONFIGS["vssd"])
  with pytest.raises(ValueError, match="segment_ids .* cannot be combined with a 2-D grid"):
    vssd.init(jax.random.key(0), x, segment_ids=jnp.asarray(IDS))
