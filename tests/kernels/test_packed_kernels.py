"""Packed sequences (segment starts) in the Pallas chunk kernels, interpret mode, against the chunked XLA form with
the same resets (which tests/ops/test_segments.py holds against each segment run alone)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers import kernels, ops
from mixers.ops.recurrence import gated_linear_recurrence
from tests.conftest import assert_close

B, T, H, K, V = 2, 64, 2, 12, 20
SCALE = 0.4
# Segments of lengths 7, 13, 1 and 20 between a first and a last one; both rows start a segment at t = 32, the
# edge of a 16- and of a 32-token chunk, and segments cross the edges of chunks and of 16-row sub-chunks.
LENGTHS = ((12, 20, 7, 13, 1, 11), (11, 1, 13, 7, 20, 12))


def _segment_ids():
  return np.stack([np.repeat(np.arange(len(row)), row) for row in LENGTHS]).astype(np.int32)


def _resets(ids):
  return jnp.asarray(np.concatenate([np.zeros((ids.shape[0], 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1))


def _inputs(decay, t=T, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  q, k = (jax.random.normal(x, (B, t, H, K)) for x in ks[:2])
  v = jax.random.normal(ks[2], (B, t, H, V))
  shape = {"none": (B, t, H), "scalar": (B, t, H), "channel": (B, t, H, K)}[decay]
  g = -jax.random.uniform(ks[3], shape)
  s0 = jax.random.normal(ks[4], (B, H, K, V))
  cotangents = jax.random.normal(ks[5], (B, t, H, V)), jax.random.normal(ks[6], (B, H, K, V))
  return (q, k, v, g, s0), cotangents


@functools.partial(jax.jit, static_argnames=("backend", "chunk", "decay"))
def _kernel_and_chunked(args, cotangents, resets, *, backend, chunk, decay):
  """[(o, state, dq, dk, dv, dg, ds0) of the kernel, the same of the chunked XLA form], one program."""
  def kernel(q, k, v, g, s0):
    return kernels.chunked_recurrence(q, k, v, None if decay == "none" else g, scale=SCALE, initial_state=s0,
                                      chunk_size=chunk, interpret=True, backend=backend, resets=resets)

  def chunked(q, k, v, g, s0):
    return gated_linear_recurrence(q, k, v, None if decay == "none" else g, scale=SCALE, initial_state=s0,
                                   chunk_size=chunk, impl="chunked", resets=resets)

  results = []
  for fn in (kernel, chunked):
    (o, s), vjp = jax.vjp(fn, *args)
    results.append((o, s) + vjp(cotangents))
  return results


@pytest.mark.parametrize("backend,decay,chunk", [("gpu", "scalar", 16), ("tpu", "none", 16),
                                                 ("tpu", "channel", 32)])
def test_packed_kernel_matches_chunked_form(backend, decay, chunk):
  """Outputs, final state and the VJP (dq, dk, dv, dlog_decay, dS0) for a random cotangent; chunk 32 with
  per-channel decays runs the 16-row sub-chunk path (off-diagonal blocks across segment starts)."""
  args, cotangents = _inputs(decay)
  got, want = _kernel_and_chunked(args, cotangents, _resets(_segment_ids()), backend=backend, chunk=chunk,
                                  decay=decay)
  for name, a, b in zip(("o", "state", "dq", "dk", "dv", "dg", "ds0"), got, want):
    if name == "dg" and decay == "none":
      continue
    assert a.shape == b.shape, name
    assert_close(a, b, 1e-5, name)


@pytest.fixture
def kernel_calls(monkeypatch):
  """Patches the ops' kernel call to the interpreted GPU kernel; the list records, per call, whether it had
  resets."""
  calls = []
  original = kernels.chunked_recurrence

  def interpreted(*args, **kwargs):
    calls.append(kwargs["resets"] is not None)
    return original(*args, **{**kwargs, "interpret": True, "backend": "gpu"})

  monkeypatch.setattr(kernels, "chunked_recurrence", interpreted)
  return calls


def _assert_trees_close(got, want):
  for i, (x, y) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
    assert_close(x, y, 1e-5, f"leaf {i}")


def test_ops_pallas_packed_run_the_kernel(kernel_calls):
  """linear_attention, ssd and lightnet with impl="pallas" and segment_ids, the kernel interpreted, equal
  impl="chunked" (outputs and final states); T = 45 is padded inside to the chunk."""
  t = 45
  (q, k, v, g, s0), _ = _inputs("scalar", t=t, seed=1)
  ids = jnp.asarray(_segment_ids()[:, :t])
  ks = jax.random.split(jax.random.PRNGKey(3), 3)
  dt = jax.nn.softplus(jax.random.normal(ks[0], (B, t, H)))
  a = -jnp.exp(jax.random.normal(ks[1], (H,)))
  bc = jax.random.normal(ks[2], (2, B, t, 1, K))

  @jax.jit
  def forms(q, k, v, g, s0, dt, a, bc):
    def run(impl):
      kw = dict(return_state=True, chunk_size=16, segment_ids=ids, impl=impl)
      return (ops.linear_attention(q, k, v, log_decay=g, initial_state=s0, **kw),
              ops.ssd(v, dt, a, bc[0], bc[1], **kw),
              ops.lightnet(q, k, v, **kw))
    return run("pallas"), run("chunked")

  got, want = forms(q, k, v, g, s0, dt, a, bc)
  assert kernel_calls == [True] * 3
  _assert_trees_close(got, want)


def test_quasiseparable_and_delta_rule_pallas_packed_run_the_kernel(kernel_calls):
  """quasiseparable (both directions through the kernel) and gated delta_rule with impl="pallas" and segment_ids,
  the kernel interpreted, equal impl="chunked"; T = 45 is padded inside to the chunk."""
  t = 45
  (q, k, v, g, s0), _ = _inputs("scalar", t=t, seed=4)
  ids = jnp.asarray(_segment_ids()[:, 10:10 + t])
  ks = jax.random.split(jax.random.PRNGKey(5), 4)
  dt = jax.nn.softplus(jax.random.normal(ks[0], (2, B, t, H)))
  a = -jnp.exp(jax.random.normal(ks[1], (H,)))
  bc = jax.random.normal(ks[2], (4, B, t, 1, K))
  beta = jax.random.uniform(ks[3], (B, t, H), minval=0.1, maxval=1.9)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)

  @jax.jit
  def forms(q, k, v, g, s0, dt, a, bc, beta):
    def run(impl):
      kw = dict(chunk_size=16, segment_ids=ids, impl=impl)
      return (ops.quasiseparable(v, tuple(dt), a, (bc[0], bc[1]), (bc[2], bc[3]), D=a, **kw),
              ops.delta_rule(q, k, v, beta, log_decay=g, initial_state=s0, return_state=True, **kw))
    return run("pallas"), run("chunked")

  got, want = forms(q, k, v, g, s0, dt, a, bc, beta)
  assert kernel_calls == [True] * 3
  _assert_trees_close(got, want)


def test_pallas_packed_off_accelerator_is_the_token_loop():
  """Lowered for CPU, impl="pallas" runs the token-loop reference with the resets (forward and VJP)."""
  args, cotangents = _inputs("channel", t=24, seed=2)
  ids = jnp.asarray(_segment_ids()[:, 8:32])

  @jax.jit
  def both(args, cotangents):
    def form(impl):
      return lambda q, k, v, g, s0: ops.linear_attention(q, k, v, log_decay=g, initial_state=s0, return_state=True,
                                                         chunk_size=16, segment_ids=ids, impl=impl)
    results = []
    for impl in ("pallas", "chunked"):
      out, vjp = jax.vjp(form(impl), *args)
      results.append(out + vjp(cotangents))
    return results

  got, want = both(args, cotangents)
  for i, (a, b) in enumerate(zip(got, want)):
    assert_close(a, b, 1e-5, f"leaf {i}")


def test_bad_resets_raise():
  (q, k, v, g, s0), _ = _inputs("scalar")
  with pytest.raises(ValueError, match=r"resets must be bool \[B,T\]"):
    kernels.chunked_recurrence(q, k, v, g, scale=1.0, initial_state=s0, chunk_size=16, interpret=True,
                               resets=jnp.zeros((B, T - 1), bool))
