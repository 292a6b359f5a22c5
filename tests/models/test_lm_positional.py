"""Positions in a language model (learned, MD-TPE) and MD-TPE on packed sequences: each segment as its own sequence."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers import models
from mixers.layers.positional import MdTpe
from mixers.ops import positional
from tests.conftest import random_variables

LOG_DECAY = np.log(np.array([0.5, 0.9]))
IDS = np.array([[0] * 5 + [1] * 3 + [2] * 5, [4] * 1 + [7] * 12])  # [B=2, T=13]; segments cross chunks of 4
LM_IDS = np.array([[0] * 5 + [1] * 3 + [2] * 5, [6] * 5 + [3] * 3 + [9] * 5])  # same cuts: one call per segment


def segments(ids):
  """[(row, lo, hi)] of each run of equal ids in ids `[B,T]`."""
  out = []
  for b, row in enumerate(np.asarray(ids)):
    cuts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]] + [len(row)]
    out += [(b, lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:])]
  return out


def alone(f, x, ids):
  """f run on each segment of x `[B,T,...]` as its own batch-1 sequence, put back in place."""
  rows = [[] for _ in range(x.shape[0])]
  for b, lo, hi in segments(ids):
    rows[b].append(f(x[b:b + 1, lo:hi]))
  return jnp.concatenate([jnp.concatenate(r, axis=1) for r in rows], axis=0)


def zeros_cache(model, *args):
  """The `cache` collection `model.init(key, *args, decode=True)` makes, as zeros, without compiling the init."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, decode=True))["cache"]
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)


def prefill_then_decode(module, variables, x, more, ids):
  """(prefill output, outputs of `more` `[B,n,...]` decoded one token at a time) after the packed prompt x."""
  cache = zeros_cache(module, jnp.concatenate([x, more], axis=1))  # sized for the prompt and the decoded tokens
  y, mut = module.apply({**variables, "cache": cache}, x, segment_ids=ids, decode=True,
                        mutable=["cache"])
  steps = []
  for t in range(more.shape[1]):
    step, mut = module.apply({**variables, **mut}, more[:, t:t + 1], decode=True, mutable=["cache"])
    steps.append(step)
  return y, jnp.concatenate(steps, axis=1)


def last_starts(ids):
  """{row: first position of its last segment} for ids `[B,T]`."""
  return {b: lo for b, lo, hi in segments(ids) if hi == ids.shape[1]}


def test_md_tpe_op_packed_equals_segments_alone(x64):
  rng = np.random.default_rng(0)
  x, ct = (rng.standard_normal((2, 13, 2, 3)) for _ in range(2))
  ids = jnp.asarray(IDS)

  @jax.jit
  def forms(x, ct):  # causal and non-causal, packed and alone: values, random-cotangent VJPs, causal final state
    out = []
    for causal in (False, True):
      tpe = lambda s: jnp.einsum("hts,bshd->bthd", positional.toeplitz_matrix(s.shape[1], LOG_DECAY, causal=causal), s)
      yp, vjp_p = jax.vjp(lambda x: positional.md_tpe(x, LOG_DECAY, causal=causal, impl="chunked", chunk_size=4,
                                                      segment_ids=ids), x)
      ya, vjp_a = jax.vjp(lambda x: alone(tpe, x, IDS), x)  # each segment through its materialised matrix
      out += [(yp, ya), (vjp_p(ct)[0], vjp_a(ct)[0])]
    state = positional.md_tpe(x, LOG_DECAY, causal=True, segment_ids=ids, return_state=True, chunk_size=4)[1]
    last = [jnp.einsum("ht,bthd->bhd", jnp.exp(LOG_DECAY[:, None] * jnp.arange(13 - lo)[::-1]), x[b:b + 1, lo:])
            for b, lo in last_starts(IDS).items()]  # sum_s lambda^{T-1-s} x_s over each row's last segment
    return out + [(state, jnp.concatenate(last)[:, :, None])]

  for packed, separate in forms(x, ct):
    np.testing.assert_allclose(packed, separate, rtol=1e-10, atol=1e-12)
  with pytest.raises(ValueError, match="segment_ids"):
    positional.md_tpe(np.zeros((1, 3, 4, 2, 3)), LOG_DECAY, segment_ids=np.zeros((1, 12), int))


def test_md_tpe_layer_packed_equals_alone_and_decodes_the_last_segment():
  x = np.random.default_rng(1).standard_normal((2, 13, 16), np.float32)
  more = np.random.default_rng(2).standard_normal((2, 3, 16), np.float32)  # decoded after the packed prompt
  layers = [MdTpe(num_heads=2, causal=causal, chunk_size=4) for causal in (False, True)]
  references = [layer.clone(impl="reference") for layer in layers]  # the segments alone, materialised
  params = random_variables(layers[1], x)
  ids = jnp.asarray(IDS)

  @jax.jit
  def forms(params, x, more):
    out = [(layer.apply(params, x, segment_ids=ids), alone(lambda s: ref.apply(params, s), x, IDS))
           for layer, ref in zip(layers, references)]
    y, steps = prefill_then_decode(layers[1], params, x, more, ids)
    full = [references[1].apply(params, jnp.concatenate([x[b:b + 1, lo:], more[b:b + 1]], axis=1))[:, -3:]
            for b, lo in last_starts(IDS).items()]  # each row's last segment, then the decoded tokens
    return out + [(y, out[1][0]), (steps, jnp.concatenate(full))]

  for packed, separate in forms(params, x, more):
    np.testing.assert_allclose(packed, separate, rtol=1e-5, atol=1e-6)  # float32 parameters


def lm(positional, **overrides):
  c = models.default_config()
  c.update(dict(mixer="gla", d_model=16, num_layers=1, vocab_size=32, positional=positional, channel_mixer="none"))
  c.mixer_kwargs.num_heads = 2
  if positional == "md_tpe":
    c.positional_kwargs.num_heads = 2
  c.update(overrides)
  return models.build_model(c)


@pytest.mark.parametrize("kind, name", [("learned", "position_embedding"), ("md_tpe", "md_tpe")])
def test_lm_positions_applied_restart_per_segment_and_decode(kind, name):
  tokens = np.random.default_rng(3).integers(0, 32, (2, 13))
  more = np.random.default_rng(4).integers(0, 32, (2, 2))
  model, plain, short = lm(kind, max_len=16), lm(""), lm(kind, max_len=8)
  variables = nn.unbox(random_variables(model, tokens))
  assert name in variables["params"]
  without = {"params": {k: v for k, v in variables["params"].items() if k != name}}
  if kind == "learned":
    short_vars = {"params": {**variables["params"], name: variables["params"][name][:8]}}
  ids = jnp.asarray(LM_IDS)

  @jax.jit
  def forms(variables, tokens, more):
    logits = model.apply(variables, tokens, segment_ids=ids)
    y, steps = prefill_then_decode(model, variables, tokens, more, ids)
    full = model.apply(variables, jnp.concatenate([tokens[:, 8:], more], axis=1))  # the last segment, then more
    separate = jnp.concatenate([model.apply(variables, tokens[:, :5]), model.apply(variables, tokens[:, 5:8]),
                                full[:, :-2]], axis=1)
    out = {"packed": (logits, separate), "prefill": (y, logits), "decode": (steps, full[:, -2:]),
           "plain": plain.apply(without, tokens, segment_ids=ids)}
    if kind == "learned":  # 8 rows: the 5-, 3- and 5-token segments fit, the 13-token unpacked rows do not
      out["short"] = short.apply(short_vars, tokens)
    return out

  out = forms(variables, tokens, more)
  for key in ("packed", "prefill", "decode"):
    np.testing.assert_allclose(*out[key], rtol=1e-5, atol=1e-5, err_msg=key)
  assert not np.allclose(out["packed"][0], out["plain"], atol=1e-4)  # the positional layer changes the logits
  if kind == "learned":  # positions past max_len turn the outputs NaN, never silently wrong numbers
    assert np.all(np.isnan(out["short"]))


@pytest.mark.parametrize("overrides, match", [
    (dict(positional="md_tpe", positional_kwargs=dict(causal=False)), "positional_kwargs.causal"),
    (dict(positional="learned", max_len=0), "max_len"),
    (dict(positional="rotary"), "positional"),
])
def test_lm_bad_positional_config(overrides, match):
  c = models.default_config()
  c.update({k: v for k, v in overrides.items() if k != "positional_kwargs"})
  c.positional_kwargs.update(overrides.get("positional_kwargs", {}))
  with pytest.raises(ValueError, match=match):
    models.build_model(c)
