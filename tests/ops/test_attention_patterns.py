"""Prefix-LM, block-causal and cross attention in linear_attention and attention, against dense float64 masks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers import ops
from mixers.sharding import make_mesh, sequence_parallel
from tests.conftest import assert_close

B, T, H, K, V = 3, 37, 2, 12, 20
CHUNK = 16  # prefix 11 and blocks of 6 or 10 do not end on chunk edges
EPS = 1e-6
DECAY_SHAPES = {"none": None, "head": (H,), "token": (B, T, H), "channel": (B, T, H, K)}


def inputs(decay="none", t=T, seed=0, dtype=jnp.float64):
  """Drawn with numpy (eager jax calls compile a program per new shape); q, k through elu + 1."""
  r = np.random.RandomState(seed)
  elu_plus_one = lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
  q, k = (elu_plus_one(r.randn(B, t, H, K)) for _ in range(2))
  v = r.randn(B, t, H, V)
  shape = DECAY_SHAPES[decay]
  if shape is not None and len(shape) > 1:
    shape = (B, t) + shape[2:]
  g = None if shape is None else -0.3 * np.logaddexp(0.0, r.randn(*shape))  # -softplus
  return tuple(None if a is None else jnp.asarray(a, dtype) for a in (q, k, v, g))


def visible(tq, tk, *, causal=True, prefix=None, block=None):
  """`[B,Tq,Tk]` bool, written out position by position."""
  p = np.broadcast_to(np.asarray(0 if prefix is None else prefix), (B,))
  m = np.zeros((B, tq, tk), bool)
  for b in range(B):
    for t in range(tq):
      for s in range(tk):
        if not causal:
          m[b, t, s] = True
        elif block is not None:
          m[b, t, s] = s // block <= t // block
        else:
          m[b, t, s] = s <= t or (t < p[b] and s < p[b])
  return m


def dense_linear(q, k, v, g, mask, *, normalize=False, scale=K ** -0.5, xp=np):
  """o_t = scale sum_s mask_ts q_t^T diag(w_ts) k_s v_s, w_ts = exp(-|c_t - c_s|), c the cumulative log-decay
  (float64 numpy, or jax.numpy for gradients with xp=jnp)."""
  q, k, v = (xp.asarray(a, np.float64) for a in (q, k, v))
  tq, tk = q.shape[1], k.shape[1]
  if g is None:
    w = xp.ones((B, tq, tk, H, K))
  else:
    g = xp.asarray(g, np.float64)
    g = xp.broadcast_to(g, (B, tq, H)) if g.ndim == 1 else g
    c = xp.cumsum(xp.broadcast_to(g[..., None] if g.ndim == 3 else g, (B, tq, H, K)), axis=1)
    w = xp.exp(-xp.abs(c[:, :, None] - c[:, None, :]))  # [B,T,S,H,K]
  a = scale * xp.einsum("bthk,bshk,btshk->bhts", q, k, w) * xp.asarray(mask)[:, None]
  o = xp.einsum("bhts,bshv->bthv", a, v)
  return o / (xp.einsum("bhts->bth", a)[..., None] + EPS) if normalize else o


def dense_softmax(q, k, v, mask):
  groups = q.shape[2] // k.shape[2]
  k, v = (np.repeat(np.asarray(a, np.float64), groups, axis=2) for a in (k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), k) / np.sqrt(q.shape[-1])
  logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


ROWS = np.array([11, 0, T], np.int32)  # per-row prefixes, 0 and T included
# name: (keyword arguments, normalize); prefixes and blocks end off the chunk edges
PATTERNS = {
    "prefix 11": (dict(prefix_len=11), False),
    "prefix rows": (dict(prefix_len=ROWS), True),
    "block 6": (dict(block_size=6), False),
    "block 10": (dict(block_size=10), True),
}
EDGES = {  # prefix 0 and blocks of 1 are causal; prefix T and blocks longer than T are non-causal
    "prefix 0": (dict(prefix_len=0), False),
    "prefix T": (dict(prefix_len=T), False),
    "block 1": (dict(block_size=1), False),
    "block 50": (dict(block_size=50), True),
}


@functools.partial(jax.jit, static_argnames="edges")
def all_patterns(q, k, v, g, rows, edges=False):
  """The patterns (and edge cases) in one program, one compilation per decay shape; `rows` stays traced."""
  out = {}
  for name, (kw, normalize) in {**PATTERNS, **(EDGES if edges else {})}.items():
    kw = dict(prefix_len=rows) if name == "prefix rows" else kw
    out[name] = ops.linear_attention(q, k, v, log_decay=g, normalize=normalize, chunk_size=CHUNK, **kw)
  return out


@pytest.mark.parametrize("decay", ["none", "head", "token", "channel"])
def test_patterns_match_dense_masks(x64, decay):
  """Prefix-LM (int, and [B] with 0 and T), blocks of 6 and 10, normalised or not, for every decay shape (with
  the edge cases for per-channel decay) against the dense float64 formula, its mask written out position by
  position."""
  q, k, v, g = inputs(decay)
  edges = decay == "channel"
  got = all_patterns(q, k, v, g, jnp.asarray(ROWS), edges=edges)
  for name, (kw, normalize) in {**PATTERNS, **(EDGES if edges else {})}.items():
    mask = visible(T, T, prefix=kw.get("prefix_len"), block=kw.get("block_size"))
    assert_close(got[name], dense_linear(q, k, v, g, mask, normalize=normalize), 1e-12, name)


@functools.partial(jax.jit, static_argnames="pattern")
def _pattern_vjps(q, k, v, g, cot, pattern):
  kw = dict(prefix_len=jnp.asarray(ROWS)) if pattern == "prefix" else dict(block_size=6)
  mask = visible(T, T, prefix=ROWS if pattern == "prefix" else None, block=kw.get("block_size"))
  f = lambda q, k, v, g: ops.linear_attention(q, k, v, log_decay=g, normalize=True, chunk_size=CHUNK, **kw)
  ref = lambda q, k, v, g: dense_linear(q, k, v, g, mask, normalize=True, xp=jnp)
  (out, vjp), (out_ref, vjp_ref) = jax.vjp(f, q, k, v, g), jax.vjp(ref, q, k, v, g)
  return out, out_ref, vjp(cot), vjp_ref(cot)


@pytest.mark.parametrize("pattern", ["prefix", "block"])
def test_gradients_match_dense(x64, pattern):
  """Random-cotangent VJP (q, k, v and the decay) of normalised Prefix-LM ([B] prefixes, per-channel decay) and
  blocks of 6 (per-token decay) against the dense formula."""
  q, k, v, g = inputs("channel" if pattern == "prefix" else "token", seed=1)
  cot = jnp.asarray(np.random.RandomState(7).randn(*v.shape))
  out, out_ref, grads, grads_ref = _pattern_vjps(q, k, v, g, cot, pattern)
  assert_close(out, out_ref, 1e-12)
  for name, a, b in zip(("q", "k", "v", "log_decay"), grads, grads_ref):
    assert_close(a, b, 1e-10, f"d{name}")


@jax.jit
def _prefix_decode(q, k, v, g):
  p, c = 11, 9
  kw = dict(normalize=True, chunk_size=CHUNK)
  full = ops.linear_attention(q, k, v, log_decay=g, prefix_len=p, **kw)
  prefill, state = ops.linear_attention(q[:, :p], k[:, :p], v[:, :p], log_decay=g[:, :p], prefix_len=p,
                                        return_state=True, **kw)
  rest = ops.linear_attention(q[:, p:], k[:, p:], v[:, p:], log_decay=g[:, p:], initial_state=state, **kw)
  s, steps = state, []
  for t in range(p, p + 4):
    o_t, s = ops.linear_attention_step(q[:, t], k[:, t], v[:, t], s, log_decay=g[:, t], normalize=True)
    steps.append(o_t)
  # initial_state = the causal state after c tokens of context: the same as the prefix moved c tokens later.
  _, ctx = ops.linear_attention(q[:, :c], k[:, :c], v[:, :c], log_decay=g[:, :c], return_state=True, **kw)
  after_ctx = ops.linear_attention(q[:, c:], k[:, c:], v[:, c:], log_decay=g[:, c:], prefix_len=p,
                                   initial_state=ctx, **kw)
  moved = ops.linear_attention(q, k, v, log_decay=g, prefix_len=c + p, **kw)
  return dict(full=full, prefill=prefill, rest=rest, steps=jnp.stack(steps, axis=1), after_ctx=after_ctx,
              moved=moved)


def test_prefix_lm_prefill_then_causal_decode(x64):
  """A normalised Prefix-LM prefill returns the causal state: decode steps, or a causal call from it, give the
  full Prefix-LM forward's outputs after the prefix. An initial state is context that every token sees."""
  q, k, v, g = inputs("token", seed=2)
  r = _prefix_decode(q, k, v, g)
  p, c = 11, 9
  assert_close(r["full"], dense_linear(q, k, v, g, visible(T, T, prefix=p), normalize=True), 1e-12, "full")
  assert_close(r["prefill"], r["full"][:, :p], 1e-12, "prefill")
  assert_close(r["rest"], r["full"][:, p:], 1e-12, "causal call after the prefix")
  assert_close(r["steps"], r["full"][:, p:p + 4], 1e-12, "decode steps")
  assert_close(r["moved"], dense_linear(q, k, v, g, visible(T, T, prefix=c + p), normalize=True), 1e-12)
  assert_close(r["after_ctx"], r["moved"][:, c:], 1e-12, "initial_state with a prefix")


@jax.jit
def _block_decode(q, k, v, g):
  bs, kw = 10, dict(block_size=10, normalize=True, chunk_size=CHUNK)
  full, final = ops.linear_attention(q, k, v, log_decay=g, return_state=True, **kw)
  state, outs = (jnp.zeros((B, H, K, V)), jnp.zeros((B, H, K))), []
  for start in range(0, T, bs):  # the last block has 7 tokens
    cut = slice(start, start + bs)
    o, state = ops.linear_attention(q[:, cut], k[:, cut], v[:, cut], log_decay=g[:, cut], initial_state=state,
                                    return_state=True, **kw)
    outs.append(o)
  return full, final, jnp.concatenate(outs, axis=1), state


def test_block_causal_decodes_a_block_at_a_time(x64):
  """One call per block of 10 from the state after the earlier blocks equals the full block-causal forward."""
  q, k, v, g = inputs("channel", seed=3)
  full, final, blocks, state = _block_decode(q, k, v, g)
  assert_close(blocks, full, 1e-12)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(final)):
    assert_close(a, b, 1e-12, "final state")


@jax.jit
def _two_patterns_changed(q, k, v, g):
  """Prefix 11 and blocks of 6, each on the inputs and on the inputs changed from token 11 (18) on."""
  out = []
  for kw, t in ((dict(prefix_len=11), 11), (dict(block_size=6), 18)):
    f = lambda q, k, v, kw=kw: ops.linear_attention(q, k, v, log_decay=g, chunk_size=CHUNK, **kw)
    out.append((f(q, k, v), f(*(a.at[:, t:].add(1.0) for a in (q, k, v)))))
  return out


def test_causality_of_prefix_and_blocks():
  """Changing the tokens from the prefix's end (or a block's start) on leaves every earlier output unchanged."""
  q, k, v, g = inputs("channel", dtype=jnp.float32)
  for (first, changed), t in zip(_two_patterns_changed(q, k, v, g), (11, 18)):
    np.testing.assert_array_equal(first[:, :t], changed[:, :t])
    assert not np.allclose(first[:, t:], changed[:, t:])


@jax.jit
def _cross(q, k, v, k_other, v_other, g):
  plain, normalized = (ops.linear_attention(q, k_other, v_other, causal=False, normalize=n) for n in (False, True))
  return plain, normalized, ops.linear_attention(q, k, v, log_decay=g, normalize=True, chunk_size=CHUNK)


def test_linear_cross_attention(x64):
  """causal=False with k, v of another length: o_t = scale q_t^T sum_s k_s v_s^T (normalised or not). Causal
  cross attention (target t reads source s <= t) needs nothing new: q from one sequence, k, v from another."""
  q, _, _, g = inputs("head", seed=4)
  _, k, v, _ = inputs(seed=5)
  _, k_other, v_other, _ = inputs(t=23, seed=6)
  plain, normalized, causal = _cross(q, k, v, k_other, v_other, g)
  assert plain.shape == (B, T, H, V)
  every = visible(T, 23, causal=False)
  assert_close(plain, dense_linear(q, k_other, v_other, None, every), 1e-12, "cross")
  assert_close(normalized, dense_linear(q, k_other, v_other, None, every, normalize=True), 1e-12, "normalised")
  assert_close(causal, dense_linear(q, k, v, g, visible(T, T), normalize=True), 1e-12, "causal cross")


SOFTMAX_CASES = (dict(prefix_len=11), dict(prefix_len=ROWS), dict(block_size=6))


@jax.jit
def _softmax_patterns(q, k, v, valid):
  tk = 23
  out = [ops.attention(q, k, v, causal=True, **kw) for kw in SOFTMAX_CASES]
  out.append(ops.attention(q, k, v, causal=True, prefix_len=25, mask=valid))
  out.append(ops.attention(q, k[:, :tk], v[:, :tk]))  # cross attention, every key
  out.append(ops.attention(q[:, :tk], k, v, causal=True))  # causal, bottom-right aligned
  return out


def test_softmax_attention_patterns():
  """Prefix-LM (int and [B]), blocks of 6, a key padding mask intersected with a prefix, cross attention and
  the causal Tq != Tk alignment, with grouped queries, for value widths equal to (jax.nn.dot_product_attention)
  and unlike (the einsum form) the key width."""
  r = np.random.RandomState(8)
  q = jnp.asarray(r.randn(B, T, 4, 8), jnp.float32)
  k = jnp.asarray(r.randn(B, T, 2, 8), jnp.float32)
  valid = np.arange(T)[None, :] < np.array([[T], [30], [20]])
  tk = 23
  for dv in (8, 6):
    v = jnp.asarray(r.randn(B, T, 2, dv), jnp.float32)
    got = _softmax_patterns(q, k, v, jnp.asarray(valid))
    refs = [dense_softmax(q, k, v, visible(T, T, prefix=kw.get("prefix_len"), block=kw.get("block_size"))[:, None])
            for kw in SOFTMAX_CASES]
    refs.append(dense_softmax(q, k, v, visible(T, T, prefix=25)[:, None] & valid[:, None, None, :]))
    refs.append(dense_softmax(q, k[:, :tk], v[:, :tk], np.ones((1, 1, T, tk), bool)))
    refs.append(dense_softmax(q[:, :tk], k, v, np.arange(T)[None, :] <= np.arange(tk)[:, None] + T - tk))
    for i, (a, b) in enumerate(zip(got, refs)):
      assert_close(a, b, 2e-6, f"case {i}, Dv={dv}")


@jax.jit
def _softmax_vjps(q, k, v, cot):
  out = []
  for kw in (dict(prefix_len=jnp.array([5, 0, 13])), dict(block_size=4)):
    prefix = np.array([5, 0, 13]) if "prefix_len" in kw else None
    mask = jnp.asarray(visible(13, 13, prefix=prefix, block=kw.get("block_size"))[:, None])

    def ref(q, k, v, mask=mask):
      logits = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(8.0), -jnp.inf)
      return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)

    (o, vjp), (o_ref, vjp_ref) = jax.vjp(lambda *a, kw=kw: ops.attention(*a, causal=True, **kw), q, k, v), \
        jax.vjp(ref, q, k, v)
    out.append((o, o_ref, vjp(cot), vjp_ref(cot)))
  return out


def test_softmax_attention_pattern_gradients(x64):
  r = np.random.RandomState(9)
  q, k, v, cot = (jnp.asarray(r.randn(B, 13, 2, 8), jnp.float64) for _ in range(4))
  for o, o_ref, grads, grads_ref in _softmax_vjps(q, k, v, cot):
    assert_close(o, o_ref, 1e-6)  # the op's logits are float32 whatever the inputs
    for name, a, b in zip("qkv", grads, grads_ref):
      assert_close(a, b, 1e-6, f"d{name}")


@functools.lru_cache(maxsize=None)
def _sp():
  return sequence_parallel(ops.linear_attention, make_mesh({"data": 2, "sequence": 4}))


@jax.jit
def _sp_patterns(q, k, v, g, rows):
  la = _sp()
  return [la(q, k, v, log_decay=g, prefix_len=rows, normalize=True, chunk_size=4),
          la(q, k, v, log_decay=g, block_size=5, chunk_size=4),
          la(q, k[:, :23], v[:, :23], causal=False, normalize=True),
          la(q, k[:, :10], v[:, :10], causal=False)]


def test_sequence_parallel_prefix_block_and_cross(x64):
  """Split over 4 slices of 10 (T = 37 padded to 40): Prefix-LM with per-row lengths, blocks of 5 (which divide
  the slices) and cross attention with k whole on every slice (also when as long as one slice) equal the dense
  formula; blocks of 6 straddle slices and raise."""
  q, k, v, g = inputs("token")
  got = _sp_patterns(q, k, v, g, jnp.asarray(ROWS))
  refs = [dense_linear(q, k, v, g, visible(T, T, prefix=ROWS), normalize=True),
          dense_linear(q, k, v, g, visible(T, T, block=5)),
          dense_linear(q, k[:, :23], v[:, :23], None, visible(T, 23, causal=False), normalize=True),
          dense_linear(q, k[:, :10], v[:, :10], None, visible(T, 10, causal=False))]
  for i, (a, b) in enumerate(zip(got, refs)):
    assert_close(a, b, 1e-12, f"case {i}")
  with pytest.raises(ValueError, match="block_size=6 must divide the length of each sequence slice"):
    _sp()(q, k, v, log_decay=g, block_size=6)


def test_bad_arguments():
  q, k, v, g = inputs("token", dtype=jnp.float32)
  bad = [
      (dict(causal=False, prefix_len=3), "need causal=True"),
      (dict(causal=False, block_size=3), "need causal=True"),
      (dict(prefix_len=3, block_size=3), "pass one of them"),
      (dict(prefix_len=-1), r"prefix_len must be in \[0, T\] = \[0, 37\]"),
      (dict(prefix_len=T + 1), r"prefix_len must be in \[0, T\]"),
      (dict(prefix_len=np.array([1, 2, 38])), r"prefix_len must be in \[0, T\]"),
      (dict(prefix_len=np.array([1, 2])), r"int array \[B\] = \(3,\)"),
      (dict(prefix_len=np.array([1.0, 2.0, 3.0])), r"int array \[B\]"),
      (dict(prefix_len=2.0), r"int array \[B\]"),
      (dict(block_size=0), "block_size must be a positive integer"),
      (dict(block_size=2.5), "block_size must be a positive integer"),
  ]
  for kw, match in bad:
    with pytest.raises(ValueError, match=match):
      ops.linear_attention(q, k, v, **kw)
    with pytest.raises(ValueError, match=match):
      ops.attention(q, k, v, causal=kw.pop("causal", True), **kw)
  with pytest.raises(ValueError, match="log_decay needs k and v as long as q"):
    ops.linear_attention(q, k[:, :20], v[:, :20], causal=False, log_decay=g)
  with pytest.raises(ValueError, match="k must have shape"):
    ops.linear_attention(q, k[:, :20], v[:, :20])  # causal needs Tk == Tq
  with pytest.raises(ValueError, match=r"v must have shape \[B,Tk,H,V\]"):
    ops.linear_attention(q, k[:, :20], v[:, :21], causal=False)
  for kw in (dict(prefix_len=3), dict(block_size=3)):
    with pytest.raises(ValueError, match=r"need queries and keys of one sequence \(Tq == Tk\)"):
      ops.attention(q, k[:, :20], v[:, :20], causal=True, **kw)
