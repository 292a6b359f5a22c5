"""HyperAttention against dense softmax attention (float64): exact regimes, error vs sample budget, causality,
gradients, odd lengths, packed sequences, argument errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers import ops
from mixers.ops.hyper_attention import lsh_buckets
from tests.conftest import assert_close, rel_rms

B, T, H, HKV, D, DV = 2, 37, 2, 1, 6, 5  # T odd, not a multiple of the blocks; grouped keys and values
# packed rows: row 0 holds three segments (a one-token one in the middle, the first id repeated after it), row 1 two
IDS = np.stack([np.repeat([0, 1, 0], (14, 1, 22)), np.repeat([4, 2], (20, 17))]).astype(np.int32)
SEGMENTS = np.cumsum(np.concatenate([np.zeros((B, 1), bool), IDS[:, 1:] != IDS[:, :-1]], 1), 1)  # index [B,T]


def dense(q, k, v, causal, mask=None, segments=None):
  """Softmax attention as the materialised [T,T] matrix: (o `[B,T,H,Dv]`, lse `[B,T,H]`); segments `[B,T]`: only
  pairs with equal entries (the segments alone)."""
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
  visible = jnp.ones(logits.shape, bool)
  if causal:
    visible &= jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
  if mask is not None:
    visible &= mask[:, None, None, :]
  if segments is not None:
    visible &= (segments[:, :, None] == segments[:, None, :])[:, None]
  logits = jnp.where(visible, logits, -jnp.inf)
  o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
  return o, jnp.swapaxes(jax.nn.logsumexp(logits, axis=-1), 1, 2)


def inputs(seed=0, t=T, structured=False, dtype=jnp.float64):
  """q, k, v; `structured`: keys and queries near 4 shared directions (the heavy entries LSH should find)."""
  kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (B, t, H, D), dtype)
  k = jax.random.normal(kk, (B, t, HKV, D), dtype)
  v = jax.random.normal(kv, (B, t, HKV, DV), dtype)
  if structured:
    centers = jax.random.normal(kc, (4, D), dtype) * 1.5
    q = 0.5 * q + centers[(3 * jnp.arange(t)) % 4][None, :, None]
    k = 0.5 * k + centers[jnp.arange(t) % 4][None, :, None]
  return q, k, v


# settings in which every part is exact; causal, T = 37 -> parts of 19 keys (padded to 20) -> 10: two levels of the
# recursion (the inner one padding an odd part), its cross part of 19 keys through the blocks and samples
EXACT = {
    "T <= min_seq_len": dict(min_seq_len=64, block_size=4, sample_size=3),
    "block covers the keys": dict(min_seq_len=10, block_size=64, sample_size=3),
    "samples cover the keys": dict(min_seq_len=10, block_size=4, sample_size=64),
}
APPROX = dict(min_seq_len=5, block_size=4, sample_size=5, lsh_num_projs=3)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_regimes_equal_softmax_attention(x64, causal):
  q, k, v = inputs()
  mask = jnp.ones((B, T), bool).at[1, 20:].set(False).at[0, 3:30:4].set(False)  # key 0 always visible
  every = jax.jit(lambda *a: (dense(*a[:3], causal, a[3]),  # the reference and every regime in one program
                              {what: ops.hyper_attention(*a[:3], causal=causal, mask=a[3], return_lse=True,
                                                         **settings) for what, settings in EXACT.items()}))
  (want, want_lse), outs = every(q, k, v, mask)
  for what, (o, lse) in outs.items():
    assert o.shape == (B, T, H, DV) and o.dtype == jnp.float64
    assert_close(o, want, 1e-12, what)
    assert_close(lse, want_lse, 1e-12, f"{what} lse")


def test_gradient_in_the_exact_regime_equals_softmax_attention(x64):
  """Random-cotangent VJP through the causal recursion and the LSH blocks (one block covers each part's keys)."""
  q, k, v = inputs(1)
  ct = jax.random.normal(jax.random.key(5), (B, T, H, DV), jnp.float64)
  hyper = functools.partial(ops.hyper_attention, causal=True, **EXACT["block covers the keys"])
  vjp = lambda f, a: jax.vjp(f, *a)[1](ct)
  both = jax.jit(lambda *a: (vjp(hyper, a), vjp(lambda *a: dense(*a, True)[0], a)))  # one program
  for name, got, want in zip("qkv", *both(q, k, v)):
    assert_close(got, want, 1e-11, f"d{name}")


@pytest.mark.parametrize("causal,budget", [(False, 24), (True, 12)])
def test_error_shrinks_as_the_sample_budget_grows(x64, causal, budget):
  """Mean relative error over 4 keys, T = 48: `budget` samples clearly below 4; deterministic per key. (The causal
  recursion's largest approximate part has T/2 keys, so T/4 samples there are what T/2 are to the non-causal form.)"""
  t = 48
  q, k, v = inputs(2, t=t, structured=True)
  keys = jax.random.split(jax.random.key(7), 4)
  budgets = (4, budget)

  @jax.jit
  def estimates(keys):  # the dense reference and both budgets over the 4 keys, one program
    runs = [jax.vmap(lambda key, samples=samples: ops.hyper_attention(
        q, k, v, causal=causal, min_seq_len=6, block_size=4, sample_size=samples, lsh_num_projs=3, key=key))(keys)
            for samples in budgets]
    return dense(q, k, v, causal)[0], runs

  want, runs = estimates(keys)
  _, again = estimates(keys)
  errors = {}
  for samples, outs, outs_again in zip(budgets, runs, again):
    errors[samples] = np.mean([rel_rms(o, want) for o in outs])
    assert rel_rms(outs[0], outs[1]) > 1e-3, "different keys should give different estimates"
    np.testing.assert_array_equal(outs_again, outs)
  assert errors[budget] < 0.7 * errors[4], errors


def test_causal_recursion_is_causal_and_its_gradients_finite(x64):
  """In the approximate regime (blocks of 4, 5 samples, odd T): changing tokens after t changes no output up to t;
  gradients through the approximation are finite and reach every input."""
  q, k, v = inputs(3)
  ct = jax.random.normal(jax.random.key(5), (B, T, H, DV), jnp.float64)

  t = 21
  later = lambda a, seed: a.at[:, t + 1:].set(jax.random.normal(jax.random.key(seed), a[:, t + 1:].shape, a.dtype))

  @jax.jit
  def outputs_and_grads(q, k, v):  # both inputs (one vmapped call), the gradients and the dense reference
    both = lambda *a: jax.vmap(functools.partial(ops.hyper_attention, causal=True, **APPROX))(*a)
    changed = (later(q, 10), later(k, 11), later(v, 12))
    ys, vjp = jax.vjp(both, *(jnp.stack(a) for a in zip((q, k, v), changed)))
    grads = [g[0] for g in vjp(jnp.stack([ct, jnp.zeros_like(ct)]))]  # the unchanged inputs' gradients
    return ys[0], grads, ys[1], dense(q, k, v, True)[0]

  y1, grads, y2, want = outputs_and_grads(q, k, v)
  np.testing.assert_allclose(y1[:, :t + 1], y2[:, :t + 1], rtol=1e-13, atol=1e-13)
  assert not np.allclose(y1[:, t + 1:], y2[:, t + 1:])
  assert rel_rms(y1, want) > 1e-3, "the setting should be approximate"
  for name, g in zip("qkv", grads):
    assert bool(jnp.all(jnp.isfinite(g))), f"d{name} not finite"
    first = 1 if name == "q" else 0  # the first output is v_0 whatever q_0 is
    assert float(jnp.min(jnp.max(jnp.abs(g[:, first:]), axis=(0, 2, 3)))) > 0, f"some token gets no d{name}"


# exact regimes with one level of the causal recursion approximated (T = 37 -> parts of 19 keys -> 10: exact)
PACKED_EXACT = {what: EXACT[what] for what in ("block covers the keys", "samples cover the keys")}


@pytest.mark.parametrize("causal", [False, True])
def test_packed_exact_regimes_equal_segments_alone(x64, causal):
  """segment_ids where one block, or the samples, cover the keys (blocks and samples masked per segment, the samples'
  scale counting the segment's keys; the causal recursion's small parts exact): each segment gets its softmax
  attention alone (the block-diagonal dense matrix)."""
  q, k, v = inputs(8)
  mask = jnp.ones((B, T), bool).at[1, 25:30].set(False).at[0, 3:12:4].set(False)  # no segment's first key
  every = jax.jit(lambda *a: (dense(*a[:3], causal, a[3], SEGMENTS),
                              {what: ops.hyper_attention(*a[:3], causal=causal, mask=a[3], segment_ids=a[4],
                                                         return_lse=True, **settings)
                               for what, settings in PACKED_EXACT.items()}))
  (want, want_lse), outs = every(q, k, v, mask, jnp.asarray(IDS))
  for what, (o, lse) in outs.items():
    assert_close(o, want, 1e-12, what)
    assert_close(lse, want_lse, 1e-12, f"{what} lse")


def test_no_gradient_crosses_a_segment_in_the_approximate_regime(x64):
  """Causal, approximate (blocks of 4 and 5 samples for the 19 keys of the recursion's cross part: the non-causal
  estimator): the VJP of one segment's outputs is exactly zero at every input of the other segments, and reaches
  the segment's own inputs."""
  q, k, v = inputs(9)
  ct = jax.random.normal(jax.random.key(5), (B, T, H, DV), jnp.float64)
  only = jnp.stack([ct * (SEGMENTS == s)[..., None, None] for s in range(3)])  # one cotangent per segment index

  @jax.jit
  def grads(q, k, v, ids):  # every segment's cotangent and the reference, one program
    hyper = functools.partial(ops.hyper_attention, causal=True, segment_ids=ids, **dict(APPROX, min_seq_len=10))
    y, vjp = jax.vjp(hyper, q, k, v)
    return y, jax.vmap(vjp)(only), dense(q, k, v, True, segments=SEGMENTS)[0]

  y, per_segment, want = grads(q, k, v, jnp.asarray(IDS))
  assert rel_rms(y, want) > 1e-3, "the setting should be approximate"
  for s in range(3):
    inside = SEGMENTS == s
    later = inside & (np.cumsum(inside, axis=1) > 1)  # the segment's first query reads its own key only
    for name, g in zip("qkv", per_segment):
      g = np.asarray(g[s])
      assert np.all(g[~inside] == 0), f"segment {s}'s outputs reach other segments' {name}"
      assert np.abs(g[later if name == "q" else inside]).max() > 0, f"segment {s} gets no d{name}"


def test_noncausal_cross_attention_in_float32():
  """Tq != Tk in float32, through the blocks (capacity from Tq) and samples covering the keys: softmax attention."""
  q = inputs(4, t=19, dtype=jnp.float32)[0]
  _, k, v = inputs(5, t=T, dtype=jnp.float32)
  o, want = jax.jit(lambda q, k, v: (ops.hyper_attention(q, k, v, **EXACT["samples cover the keys"]),
                                     dense(q, k, v, False)[0]))(q, k, v)
  assert o.shape == (B, 19, H, DV) and o.dtype == jnp.float32
  assert_close(o, want, 1e-5)


def test_lsh_buckets_number_cells_in_gray_order():
  """Sign patterns of P = 5 axis projections: numbers 0..31 each once, consecutive ones one sign apart."""
  p = 5
  signs = jnp.array([[(cell >> i) & 1 for i in range(p)] for cell in range(2 ** p)], jnp.float32) * 2 - 1
  buckets = np.asarray(jax.jit(lsh_buckets)(signs, jnp.eye(p)))
  assert sorted(buckets) == list(range(2 ** p))
  cells = np.argsort(buckets)
  assert all(bin(int(a) ^ int(b)).count("1") == 1 for a, b in zip(cells[:-1], cells[1:]))


BAD = [
    (dict(block_size=0), "block_size must be a positive integer"),
    (dict(sample_size=-1), "sample_size must be a non-negative integer"),
    (dict(min_seq_len=2.5), "min_seq_len must be a positive integer"),
    (dict(lsh_num_projs=0), "lsh_num_projs must be a positive integer"),
    (dict(lsh_num_projs=25), "lsh_num_projs must be at most 24"),
    (dict(capacity_factor=0.5), "capacity_factor must be a number >= 1"),
    (dict(mask=jnp.ones((B, T + 1), bool)), r"mask must have shape \[B,Tk\]"),
    (dict(mask=jnp.ones((B, T), jnp.int32)), "mask must be a bool array"),
    (dict(key=3), "key must be a scalar PRNG key"),
    (dict(segment_ids=jnp.zeros((B, T + 1), jnp.int32)), r"segment_ids must be an int array \[B,T\]"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[next(iter(kw)) + str(i) for i, (kw, _) in enumerate(BAD)])
def test_bad_arguments_raise_naming_them(kwargs, message):
  q, k, v = inputs(dtype=jnp.float32)
  with pytest.raises(ValueError, match=message):
    ops.hyper_attention(q, k, v, **kwargs)


def test_bad_shapes_raise_naming_the_argument():
  q, k, v = inputs(dtype=jnp.float32)
  with pytest.raises(ValueError, match=r"k must have shape \[B,Tk,Hkv,D\]"):
    ops.hyper_attention(q, k[..., :-1], v)
  with pytest.raises(ValueError, match=r"v must have shape \[B,Tk,Hkv,Dv\]"):
    ops.hyper_attention(q, k, v[:, :-1])
  with pytest.raises(ValueError, match="causal hyper_attention needs as many keys as queries"):
    ops.hyper_attention(q[:, :-1], k, v, causal=True)
  with pytest.raises(ValueError, match="segment_ids .* need self attention"):
    ops.hyper_attention(q[:, :-1], k, v, segment_ids=jnp.asarray(IDS))
  with pytest.raises(ValueError, match="q must have shape"):
    ops.hyper_attention(q[0], k, v)
