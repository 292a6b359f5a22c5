"""Packed sequences: with `segment_ids`, every op equals each segment run alone (float64, values and gradients)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers import ops
from mixers.ops.lightnet import lightnet_reference
from mixers.sharding import make_mesh, sequence_parallel
from tests.conftest import assert_close

B, H, K, V = 2, 2, 5, 3
LENGTHS = ((7, 13, 1, 20), (10, 10, 21))  # row 0: a one-token segment, starts at 7 and 21 (chunk edges of 7)
T = 41
IDS = np.stack([np.repeat(np.arange(4), LENGTHS[0]), np.repeat([0, 1, 0], LENGTHS[1])]).astype(np.int32)
DECAY_SHAPES = {"none": None, "head": (H,), "token": (B, T, H), "channel": (B, T, H, K)}


def segments(row):
  """[(start, end)] of the runs of equal ids in row `row` of IDS."""
  edges = np.cumsum((0,) + LENGTHS[row])
  return list(zip(edges[:-1], edges[1:]))


def separately(fn, timed, state=None):
  """Runs fn(timed slices, state or None) -> (o, final) on every segment of every row alone (the initial state
  reaches each row's first segment) and puts the outputs back in place: (o `[B,T,...]`, each row's last final)."""
  rows, finals = [], []
  for b in range(B):
    outs = []
    for i, (start, end) in enumerate(segments(b)):
      cut = [None if x is None else x[b:b + 1, start:end] for x in timed]
      o, final = fn(cut, None if state is None or i else jax.tree.map(lambda a: a[b:b + 1], state))
      outs.append(o)
    rows.append(jnp.concatenate(outs, axis=1))
    finals.append(final)
  return jnp.concatenate(rows), (None if finals[0] is None else jax.tree.map(lambda *a: jnp.concatenate(a), *finals))


def linear_inputs(decay, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  q, k = (ops.feature_maps.elu_plus_one(jax.random.normal(ks[i], (B, T, H, K), jnp.float64)) for i in range(2))
  v = jax.random.normal(ks[2], (B, T, H, V), jnp.float64)
  shape = DECAY_SHAPES[decay]
  g = None if shape is None else -0.3 * jax.nn.softplus(jax.random.normal(ks[3], shape, jnp.float64))
  s0 = jax.random.normal(ks[4], (B, H, K, V), jnp.float64)
  return q, k, v, g, s0


@functools.partial(jax.jit, static_argnames=("causal", "normalize", "impl", "chunk"))
def _linear_packed_and_alone(q, k, v, g, s0, cot, causal, normalize, impl, chunk):
  kw = dict(causal=causal, normalize=normalize, impl=impl, chunk_size=chunk)
  init = None if not causal else ((s0, jnp.abs(s0[..., 0])) if normalize else s0)

  def packed(q, k, v, g):
    return ops.linear_attention(q, k, v, log_decay=g, segment_ids=jnp.asarray(IDS), initial_state=init, **kw)

  def alone(q, k, v, g):
    per_head = g is not None and g.ndim == 1  # a [H] decay is not cut along time

    def one(cut, state):
      q, k, v, g_cut = cut
      decay = g if per_head else g_cut
      if not causal:
        return ops.linear_attention(q, k, v, log_decay=decay, **kw), None
      return ops.linear_attention(q, k, v, log_decay=decay, initial_state=state, return_state=True, **kw)
    return separately(one, (q, k, v, None if per_head else g), init)[0]

  (out, vjp), (out_ref, vjp_ref) = jax.vjp(packed, q, k, v, g), jax.vjp(alone, q, k, v, g)
  return out, out_ref, vjp(cot), vjp_ref(cot)


CASES = [  # (decay, causal, normalize, impl, chunk)
    ("none", True, False, "chunked", 7),  # starts at 7 and 21: on chunk edges
    ("head", True, True, "recurrent", 7),
    ("token", True, False, "reference", 7),
    ("channel", True, True, "chunked", 32),  # sub-chunks of 16: starts inside and across them
    ("token", False, True, "chunked", 7),
    ("channel", False, False, "chunked", 32),
]


@pytest.mark.parametrize("decay,causal,normalize,impl,chunk", CASES)
def test_linear_attention_packed_equals_segments_alone(x64, decay, causal, normalize, impl, chunk):
  """Outputs and random-cotangent VJPs (q, k, v, decay) of the packed call equal those of each segment alone, with
  the initial state reaching only each row's first segment."""
  q, k, v, g, s0 = linear_inputs(decay)
  cot = jax.random.normal(jax.random.key(9), v.shape, jnp.float64)
  out, ref, grads, grads_ref = _linear_packed_and_alone(q, k, v, g, s0, cot, causal, normalize, impl, chunk)
  assert_close(out, ref, 1e-12, "output")
  for name, a, b in zip("qkvg", grads, grads_ref):
    if b is not None:
      assert_close(a, b, 1e-11, f"d{name}")


@jax.jit
def _step_after_packed_prefill(q, k, v, g, s0):
  _, state = ops.linear_attention(q[:, :-1], k[:, :-1], v[:, :-1], log_decay=g[:, :-1], initial_state=s0,
                                  segment_ids=jnp.asarray(IDS[:, :-1]), return_state=True, chunk_size=7)
  o_step, _ = ops.linear_attention_step(q[:, -1], k[:, -1], v[:, -1], state, log_decay=g[:, -1])
  last = [segments(b)[-1][0] for b in range(B)]
  alone = [ops.linear_attention(*(x[b:b + 1, start:] for x in (q, k, v)), log_decay=g[b:b + 1, start:],
                                chunk_size=7)[0, -1] for b, start in enumerate(last)]
  return o_step, jnp.stack(alone)


def test_linear_attention_final_state_is_the_last_segments(x64):
  """The returned state of a packed causal call is each row's last segment's: the decode step after it equals the
  forward of that segment one token longer."""
  o_step, alone = _step_after_packed_prefill(*linear_inputs("token", seed=1))
  assert_close(o_step, alone, 1e-12)


def ssd_inputs(seed=0, groups=1, heads=2, p=3, n=4):
  ks = jax.random.split(jax.random.key(seed), 7)
  x = jax.random.normal(ks[0], (B, T, heads, p), jnp.float64)
  dt = jax.nn.softplus(jax.random.normal(ks[1], (B, T, heads), jnp.float64))
  a = -jnp.exp(jax.random.normal(ks[2], (heads,), jnp.float64))
  bb, cc = (jax.random.normal(ks[i], (B, T, groups, n), jnp.float64) for i in (3, 4))
  d = jax.random.normal(ks[5], (heads,), jnp.float64)
  s0 = jax.random.normal(ks[6], (B, heads, p, n), jnp.float64)
  return x, dt, a, bb, cc, d, s0


@functools.partial(jax.jit, static_argnames=("causal", "impl"))
def _ssd_packed_and_alone(x, dt, a, bb, cc, d, s0, cot, causal, impl):
  kw = dict(D=d, causal=causal, impl=impl, chunk_size=7)
  init = s0 if causal else None
  packed = lambda x, dt, bb, cc: ops.ssd(x, dt, a, bb, cc, segment_ids=jnp.asarray(IDS), initial_state=init, **kw)

  def alone(x, dt, bb, cc):
    def one(cut, state):
      if not causal:
        return ops.ssd(*cut[:2], a, *cut[2:], **kw), None
      return ops.ssd(*cut[:2], a, *cut[2:], initial_state=state, return_state=True, **kw)
    return separately(one, (x, dt, bb, cc), init)[0]

  (out, vjp), (out_ref, vjp_ref) = jax.vjp(packed, x, dt, bb, cc), jax.vjp(alone, x, dt, bb, cc)
  return out, out_ref, vjp(cot), vjp_ref(cot)


@pytest.mark.parametrize("causal,impl,groups", [(True, "chunked", 2), (True, "reference", 1), (False, "chunked", 2),
                                                (False, "reference", 1)])
def test_ssd_packed_equals_segments_alone(x64, causal, impl, groups):
  """Mamba2's grouped chunked form, the core's forms and VSSD's non-causal SSD, packed against each segment alone
  (outputs and VJPs into x, dt, B, C)."""
  x, dt, a, bb, cc, d, s0 = ssd_inputs(groups=groups, heads=4 if groups == 2 else 2)
  cot = jax.random.normal(jax.random.key(3), x.shape, jnp.float64)
  out, ref, grads, grads_ref = _ssd_packed_and_alone(x, dt, a, bb, cc, d, s0, cot, causal, impl)
  assert_close(out, ref, 1e-12, "output")
  for name, g1, g2 in zip(("x", "dt", "B", "C"), grads, grads_ref):
    assert_close(g1, g2, 1e-11, f"d{name}")


@functools.partial(jax.jit, static_argnames="impl")
def _delta_packed_and_alone(q, k, v, beta, g, s0, cot, impl):
  """(packed outputs, alone outputs, their VJPs; the token loop's without VJPs)."""
  kw = dict(impl=impl, chunk_size=7)
  packed = lambda q, k, v, beta, g: ops.delta_rule(q, k, v, beta, log_decay=g, initial_state=s0, return_state=True,
                                                   segment_ids=jnp.asarray(IDS), **kw)

  def alone(q, k, v, beta, g):
    one = lambda cut, state: ops.delta_rule(*cut[:4], log_decay=cut[4], initial_state=state, return_state=True, **kw)
    return separately(one, (q, k, v, beta, g), s0)

  if impl == "recurrent":
    return packed(q, k, v, beta, g), alone(q, k, v, beta, g), (), ()
  (out, vjp), (out_ref, vjp_ref) = jax.vjp(packed, q, k, v, beta, g), jax.vjp(alone, q, k, v, beta, g)
  cots = (cot, jnp.zeros_like(s0))
  return out, out_ref, vjp(cots), vjp_ref(cots)


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_delta_rule_packed_equals_segments_alone(x64, impl):
  """Gated DeltaNet, WY chunked form (starts on and off chunk edges; with VJPs into q, k, v, beta, g) and token
  loop: outputs and final states (the last segment's) equal each segment alone."""
  q, k, v, g, s0 = linear_inputs("token", seed=8)
  q, k = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
  beta = jax.nn.sigmoid(jax.random.normal(jax.random.key(10), g.shape, jnp.float64))
  cot = jax.random.normal(jax.random.key(11), v.shape, jnp.float64)
  out, ref, grads, grads_ref = _delta_packed_and_alone(q, k, v, beta, g, s0, cot, impl)
  for a, b, name in zip(out, ref, ("output", "final state")):
    assert_close(a, b, 1e-12, name)
  for name, a, b in zip(("q", "k", "v", "beta", "g"), grads, grads_ref):
    assert_close(a, b, 1e-11, f"d{name}")


def test_attention_packed_equals_segments_alone(x64):
  """Softmax attention with grouped queries, causal and not: a token sees only its own segment (the third run of
  row 1 reuses the first run's id and still sees only itself)."""
  q, k, v, _, _ = linear_inputs("none", seed=2)
  k, v = k[:, :, :1], v[:, :, :1]

  @jax.jit
  def run(q, k, v):
    packed = [ops.attention(q, k, v, causal=c, segment_ids=jnp.asarray(IDS)) for c in (True, False)]
    alone = [separately(lambda cut, _, c=c: (ops.attention(*cut, causal=c), None), (q, k, v))[0]
             for c in (True, False)]
    return packed, alone

  for got, want in zip(*run(q, k, v)):
    assert_close(got, want, 1e-6)  # jax.nn.dot_product_attention takes its softmax in float32


def _packed_calls(la, sd, qs, dr, ln, q, k, v, g, s0, x, dt, a, bb, cc, d, s0_ssd):
  """Linear attention (causal with decay and state, non-causal), SSD (causal with state, non-causal), Hydra, the
  gated delta rule and LightNet (causal with state, non-causal), packed; `la`, `sd`, `qs`, `dr`, `ln` are the ops or
  their sequence-parallel versions."""
  ids = jnp.asarray(IDS)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return (la(q, k, v, log_decay=g, initial_state=s0, return_state=True, segment_ids=ids, chunk_size=7),
          dr(unit(q), unit(k), v, jax.nn.sigmoid(g[..., 0]), log_decay=g[..., 1], initial_state=s0, return_state=True,
             segment_ids=ids, chunk_size=7),
          la(q, k, v, causal=False, log_decay=g[..., 0], segment_ids=ids, chunk_size=7),
          sd(x, dt, a, bb, cc, D=d, initial_state=s0_ssd, return_state=True, segment_ids=ids, chunk_size=7),
          sd(x, dt, a, bb, cc, D=d, causal=False, segment_ids=ids, chunk_size=7),
          qs(x, (dt, dt[:, ::-1]), a, (bb, cc), (cc, bb), D=d, segment_ids=ids, chunk_size=7),
          ln(q, 3 * k, v, initial_state=(s0, g[:, 0]), return_state=True, segment_ids=ids, chunk_size=7),
          ln(q, 3 * k, v, causal=False, segment_ids=ids, chunk_size=7))


def test_sequence_parallel_packed_equals_one_device(x64):
  """Split over data=2 x sequence=4 (T=41: padded inside) with segments crossing slice boundaries, the packed ops
  equal the one-device packed calls (outputs and final states)."""
  mesh = make_mesh({"data": 2, "sequence": 4})
  plain = (ops.linear_attention, ops.ssd, ops.quasiseparable, ops.delta_rule, ops.lightnet)
  args = linear_inputs("channel", seed=3) + ssd_inputs(seed=4)
  got = jax.jit(functools.partial(_packed_calls, *(sequence_parallel(op, mesh) for op in plain)))(*args)
  want = jax.jit(functools.partial(_packed_calls, *plain))(*args)
  for i, (a, b) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want))):
    assert_close(a, b, 1e-12, f"leaf {i}")


def test_segment_id_errors():
  q = jnp.ones((B, T, H, K))
  with pytest.raises(ValueError, match=r"segment_ids must be an int array \[B,T\]"):
    ops.linear_attention(q, q, q, segment_ids=jnp.zeros((B, T - 1), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids must be an int array"):
    ops.attention(q, q, q, segment_ids=jnp.zeros((B, T)))
  with pytest.raises(ValueError, match="cannot be combined with prefix_len"):
    ops.linear_attention(q, q, q, prefix_len=3, segment_ids=jnp.asarray(IDS))
  with pytest.raises(ValueError, match="segment_ids must be an int array"):
    ops.linear_attention(q, q, q, segment_ids=jnp.zeros((B, T)), impl="pallas")
  with pytest.raises(ValueError, match="Tq == Tk"):
    ops.attention(q, q[:, :5], q[:, :5], segment_ids=jnp.asarray(IDS))


def test_quasiseparable_packed_equals_segments_alone(x64):
  """Hydra, chunked and materialised: both directions restart at each boundary and neither shift crosses one
  (D per token)."""
  x, dtf, a, bf, cf, _, _ = ssd_inputs(seed=5)
  _, dtb, _, bb, cb, _, _ = ssd_inputs(seed=6)
  d = jax.random.normal(jax.random.key(7), dtf.shape, jnp.float64)

  @jax.jit
  def run(x, dtf, dtb, bf, bb, cf, cb, d):
    out = {}
    for impl in ("chunked", "reference"):
      kw = dict(chunk_size=7, impl=impl)
      packed = ops.quasiseparable(x, (dtf, dtb), a, (bf, bb), (cf, cb), D=d, segment_ids=jnp.asarray(IDS), **kw)
      one = lambda cut, _, kw=kw: (ops.quasiseparable(cut[0], cut[1:3], a, cut[3:5], cut[5:7], D=cut[7], **kw), None)
      out[impl] = packed, separately(one, (x, dtf, dtb, bf, bb, cf, cb, d))[0]
    return out

  for impl, (got, want) in run(x, dtf, dtb, bf, bb, cf, cb, d).items():
    assert_close(got, want, 1e-12, impl)


def test_lightnet_packed_equals_segments_alone(x64):
  """LightNet, causal (with state, MD-LRPE phases) and non-causal: the normalisers and sums restart per segment;
  against each segment alone and the materialised formula with the segment mask."""
  q, k, v, _, _ = linear_inputs("none", seed=12)
  k = 3.0 * k  # keys far apart: the normaliser matters
  phases = jax.random.uniform(jax.random.key(13), q.shape, jnp.float64, 0, 3)
  s0 = (jax.random.normal(jax.random.key(14), (B, H, 2 * K, V), jnp.float64),
        jax.random.normal(jax.random.key(15), (B, H, K), jnp.float64))
  ids = jnp.asarray(IDS)

  @jax.jit
  def run(q, k, v, phases):
    kw = dict(chunk_size=7)
    causal = ops.lightnet(q, k, v, phases=phases, initial_state=s0, return_state=True, segment_ids=ids, **kw)
    one = lambda cut, state: ops.lightnet(*cut[:3], phases=cut[3], initial_state=state, return_state=True, **kw)
    alone = separately(one, (q, k, v, phases), s0)
    noncausal = ops.lightnet(q, k, v, causal=False, segment_ids=ids, **kw)
    nc_alone = separately(lambda cut, _: (ops.lightnet(*cut, causal=False), None), (q, k, v))[0]
    dense = lightnet_reference(q, k, v, causal=False, segment_ids=ids)
    return causal, alone, noncausal, nc_alone, dense

  causal, alone, noncausal, nc_alone, dense = run(q, k, v, phases)
  for i, (a, b) in enumerate(zip(jax.tree.leaves(causal), jax.tree.leaves(alone))):
    assert_close(a, b, 1e-12, f"causal leaf {i}")
  assert_close(noncausal, nc_alone, 1e-12, "non-causal")
  assert_close(noncausal, dense, 1e-12, "non-causal vs formula")


def test_long_conv_packed_equals_segments_alone(x64):
  """Causal and bidirectional long convolutions (FFT and Monarch DFT) restart per segment (values, and VJPs into u
  and k); under jit the segment bound is required, and a row with more segments than it gives NaN, a concrete one a ValueError."""
  u = jax.random.normal(jax.random.key(16), (B, T, 3), jnp.float64)
  k, k_rev = (jax.random.normal(jax.random.key(i), (T, 3), jnp.float64) for i in (17, 18))
  ids = jnp.asarray(IDS)

  @jax.jit
  def run(u, k, k_rev):
    out = {}
    for name, kw in {"causal": {}, "bidirectional fft": dict(k_rev=k_rev),
                     "bidirectional monarch": dict(k_rev=k_rev, impl="monarch")}.items():
      one = lambda cut, _, kw=kw: (ops.long_conv(cut[0], k[:cut[0].shape[1]], **{
          **kw, "k_rev": None if "k_rev" not in kw else k_rev[:cut[0].shape[1]]}), None)
      out[name] = ops.long_conv(u, k, segment_ids=ids, max_segments=4, **kw), separately(one, (u,))[0]
    out["overflow"] = ops.long_conv(u, k, segment_ids=ids, max_segments=3)
    cot = jax.random.normal(jax.random.key(19), u.shape, jnp.float64)
    packed = lambda u, k: ops.long_conv(u, k, k_rev=k_rev, segment_ids=ids, max_segments=4)
    alone = lambda u, k: separately(lambda cut, _: (ops.long_conv(cut[0], k[:cut[0].shape[1]],
                                                                  k_rev=k_rev[:cut[0].shape[1]]), None), (u,))[0]
    out["vjp"] = jax.vjp(packed, u, k)[1](cot), jax.vjp(alone, u, k)[1](cot)
    return out

  out = run(u, k, k_rev)
  for name in ("causal", "bidirectional fft", "bidirectional monarch"):
    assert_close(*out[name], 1e-12, name)
  for name, a, b in zip(("du", "dk"), *out["vjp"]):
    assert_close(a, b, 1e-12, name)
  assert bool(jnp.all(jnp.isnan(out["overflow"][0]))) and not bool(jnp.any(jnp.isnan(out["overflow"][1])))
  assert_close(ops.long_conv(u, k, segment_ids=ids), out["causal"][1], 1e-12, "concrete ids count the segments")
  with pytest.raises(ValueError, match="more than max_segments=3"):
    ops.long_conv(u, k, segment_ids=ids, max_segments=3)
  with pytest.raises(ValueError, match="max_segments"):
    jax.jit(lambda u, ids: ops.long_conv(u, k, segment_ids=ids))(u, ids)
