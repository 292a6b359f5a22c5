"""How the kernels tile the work (interpret mode): the GPU's two phases (a state pass tiled over key and value blocks,
chunk-parallel outputs and gradients) and the TPU's value tiles, against the chunked XLA form; and the grids each
kernel launches at the target shape."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers import kernels
from mixers.kernels import chunk_gpu
from mixers.kernels import dispatch
from mixers.kernels import chunk_tpu
from mixers.kernels.introspect import pallas_calls
from mixers.kernels.introspect import pallas_grids
from mixers.ops.recurrence import gated_linear_recurrence
from tests.conftest import assert_close

# K = 72 pads to 128 and V = 136 to 256: on the GPU two key blocks and four value blocks of 64, on the TPU two value
# tiles of 128 lanes; T = 48 in chunks of 16: three chunks.
B, T, H, K, V, C = 1, 48, 1, 72, 136, 16
SCALE = 0.3


def _inputs(decay, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  q, k = (jax.random.normal(x, (B, T, H, K)) for x in ks[:2])
  v = jax.random.normal(ks[2], (B, T, H, V))
  g = -jax.random.uniform(ks[3], (B, T, H, K) if decay == "channel" else (B, T, H))
  s0 = jax.random.normal(ks[4], (B, H, K, V))
  cotangents = jax.random.normal(ks[5], (B, T, H, V)), jax.random.normal(ks[6], (B, H, K, V))
  return (q, k, v, g, s0), cotangents


@functools.partial(jax.jit, static_argnames=("backend",))
def _kernel_and_chunked(args, cotangents, resets, *, backend):
  kw = dict(scale=SCALE, chunk_size=C, resets=resets)
  kernel = lambda q, k, v, g, s0: kernels.chunked_recurrence(q, k, v, g, initial_state=s0, interpret=True,
                                                             backend=backend, **kw)
  chunked = lambda q, k, v, g, s0: gated_linear_recurrence(q, k, v, g, initial_state=s0, impl="chunked", **kw)
  results = []
  for fn in (kernel, chunked):
    (o, s), vjp = jax.vjp(fn, *args)
    results.append((o, s) + vjp(cotangents))
  return results


@pytest.mark.parametrize("backend,decay,packed", [("gpu", "scalar", True), ("gpu", "channel", False),
                                                  ("tpu", "channel", True)])
def test_tiled_kernels_equal_the_chunked_form(backend, decay, packed):
  """Outputs, final state, dq, dk, dv, dlog_decay and dS0 (a random cotangent); packed rows start segments inside
  the second chunk and exactly at the third chunk's edge (t = 32)."""
  args, cotangents = _inputs(decay)
  resets = (jnp.zeros((B, T), bool).at[:, 21].set(True).at[:, 32].set(True) if packed else None)
  got, want = _kernel_and_chunked(args, cotangents, resets, backend=backend)
  for name, a, b in zip(("o", "state", "dq", "dk", "dv", "dg", "ds0"), got, want):
    assert a.shape == b.shape, name
    assert_close(a, b, 1e-5, name)


def _operands(per_channel, *, bh=16, t=8192, d=128, c=64, tpu=False):
  """ShapeDtypeStructs of (q, k, v, g, aux, S0) as `dispatch` lays them out for the backend, B=1, K = V = d: GPU
  `[B,T,H,D]` (per-channel g too), TPU rows `[B*H,T,D]`."""
  f32 = jnp.float32
  seq = lambda width, dtype=jnp.bfloat16: jax.ShapeDtypeStruct((bh, t, width) if tpu else (1, t, bh, width), dtype)
  g = seq(d, f32) if per_channel else jax.ShapeDtypeStruct((bh, t, 1), f32)
  n = t // c
  aux = ((bh, n * d, 1) if per_channel else (bh, n, 1, c) if tpu else (bh, 1, t))
  return seq(d), seq(d), seq(d), g, jax.ShapeDtypeStruct(aux, f32), jax.ShapeDtypeStruct((bh, d, d), f32)


@pytest.mark.parametrize("per_channel", [False, True])
def test_gpu_programs_per_phase_at_the_target_shape(per_channel):
  """B=1, H=16, T=8192, K=V=128, chunks of 64: the state passes are tiled (16 heads x 2 key x 2 value blocks), the
  output and gradient kernels run every (head, chunk, value block) in parallel: 16 * 128 * 2 = 4,096 programs."""
  kw = dict(scale=1.0, chunk=64, per_channel=per_channel)
  q, k, v, g, aux, state = _operands(per_channel)
  forward = pallas_grids(lambda *a: chunk_gpu.forward(*a, **kw), q, k, v, g, aux, state)
  assert forward == {"chunk_recurrence_state_pass": (16, 2, 2), "chunk_recurrence_fwd": (16, 128, 2)}
  assert np.prod(forward["chunk_recurrence_fwd"]) == 4096
  backward = pallas_grids(lambda *a: chunk_gpu.backward(*a, **kw), q, k, v, g, aux, state, v, state)
  assert backward == {"chunk_recurrence_state_pass": (16, 2, 2), "chunk_recurrence_dstate_pass": (16, 2, 2),
                      "chunk_recurrence_bwd": (16, 128, 2)}


@pytest.mark.parametrize("d,tiles", [(128, 1), (256, 2)])
def test_tpu_grid_at_the_target_shape(d, tiles):
  """B=1, H=16, T=8192 in chunks of 64: 16 blocks of 512 tokens per head and value tile; V=256 is two parallel
  tiles of 128 lanes, forward and backward."""
  q, k, v, g, aux, state = _operands(True, d=d, tpu=True)
  kw = dict(scale=1.0, chunk=64, per_channel=True)
  assert pallas_grids(lambda *a: chunk_tpu.forward(*a, **kw), q, k, v, g, aux, state) == {
      "chunk_recurrence_fwd": (16, tiles, 16)}
  assert pallas_grids(lambda *a: chunk_tpu.backward(*a, **kw), q, k, v, g, aux, state, v, state) == {
      "chunk_recurrence_bwd_dq": (16, tiles, 16), "chunk_recurrence_bwd_dkdv": (16, tiles, 16)}


def _compiler_params(fn, *args):
  """{kernel name: (num_warps, num_stages)} of the pallas_calls in fn's jaxpr."""
  return {name: (eqn.params["compiler_params"].num_warps, eqn.params["compiler_params"].num_stages)
          for name, eqn in pallas_calls(fn, *args)}


def test_gpu_tuning_sets_warps_and_stages_per_phase():
  """`tuning` reaches each phase's Triton parameters through `chunked_recurrence` (others keep 4 warps, 1 stage);
  an unknown phase or a warp count that is not a power of two is a ValueError naming the phases."""
  q = k = v = jnp.zeros((1, 128, 2, 32), jnp.bfloat16)
  g = jnp.zeros((1, 128, 2))
  tuning = (("output", 8, 2), ("dstate_pass", 2, 3), ("gradients", 8, 1))
  run = lambda q, k, v, g: kernels.chunked_recurrence(q, k, v, g, scale=1.0, initial_state=None, chunk_size=64,
                                                      backend="gpu", tuning=tuning)[0].astype(jnp.float32).sum()
  assert _compiler_params(jax.value_and_grad(run), q, k, v, g) == {
      "chunk_recurrence_state_pass": (4, 1), "chunk_recurrence_fwd": (8, 2), "chunk_recurrence_dstate_pass": (2, 3),
      "chunk_recurrence_bwd": (8, 1)}
  for bad in ((("outputs", 4, 1),), (("output", 6, 1),), (("output", 4, 0),)):
    with pytest.raises(ValueError, match="state_pass"):
      kernels.chunked_recurrence(q, k, v, g, scale=1.0, initial_state=None, chunk_size=64, backend="gpu",
                                 tuning=bad)


def _edge_dtypes(fn, *args):
  """The dtypes of the chunk-edge states the state passes of fn's jaxpr store (their first output)."""
  return [eqn.outvars[0].aval.dtype for name, eqn in pallas_calls(fn, *args) if "state_pass" in name]


@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_gpu_bf16_edge_states_give_the_float32_edges_bits(decay):
  """bf16 inputs: the state passes (forward, and both in the backward) store the chunk-edge states in bf16, half of
  float32's bytes, and the outputs, final state, dq, dk, dv and dS0 are bit-identical to float32 edges: an edge is
  read only as a matmul operand cast to the inputs' dtype. Float32 inputs keep float32 edges."""
  (q, k, v, g, s0), (do, ds) = _inputs(decay)
  q, k, v, do = (x[..., :32].astype(jnp.bfloat16) for x in (q, k, v, do))
  s0, ds = s0[:, :, :32, :32], ds[:, :, :32, :32]
  g = g[..., :32] if decay == "channel" else g
  config = dispatch.KernelConfig(SCALE, C, decay == "channel", True, "gpu")
  ops = dispatch._prepare("gpu", config, q, k, v, g, s0)  # pylint: disable=protected-access
  ds = ds.reshape(ops[-1].shape)
  kw = dict(scale=SCALE, chunk=C, per_channel=decay == "channel", interpret=True)
  run = lambda edges_dtype: (chunk_gpu.forward(*ops, edges_dtype=edges_dtype, **kw),
                             chunk_gpu.backward(*ops, do, ds, edges_dtype=edges_dtype, **kw))
  half, full = run(None), run(jnp.float32)
  for a, b in zip(jax.tree_util.tree_leaves(half), jax.tree_util.tree_leaves(full)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  bwd = lambda *a: chunk_gpu.backward(*a, **kw)
  assert _edge_dtypes(lambda *a: chunk_gpu.forward(*a, **kw), *ops) == [jnp.bfloat16]
  assert _edge_dtypes(bwd, *ops, do, ds) == [jnp.bfloat16, jnp.bfloat16]
  f32_ops = [x.astype(jnp.float32) for x in ops]
  assert _edge_dtypes(bwd, *f32_ops, do.astype(jnp.float32), ds) == [jnp.float32, jnp.float32]
