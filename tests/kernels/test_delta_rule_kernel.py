"""The delta rule's kernel path (WY in XLA, output and state passes in the Pallas chunk kernel): interpret mode
against the chunked XLA form, values and gradients; lowering for TPU and CUDA with the kernel in both passes."""
import functools

import jax
import jax.numpy as jnp
import pytest

from mixers import ops
from mixers.kernels.chunk_gpu import TRITON_CUSTOM_CALL
from mixers.ops import delta_chunked
from tests.conftest import assert_close

B, T, H, K, V, C = 1, 37, 2, 12, 20, 16  # T is not a multiple of the chunk


def _inputs(seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(ks[0], (B, T, H, K), dtype)
  k = jax.random.normal(ks[1], (B, T, H, K))
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
  v = jax.random.normal(ks[2], (B, T, H, V), dtype)
  beta = jax.random.uniform(ks[3], (B, T, H), minval=0.1, maxval=1.9)  # eigenvalues of I - beta k k^T in (-1, 1)
  g = -jax.random.uniform(ks[4], (B, T, H), maxval=0.5)
  s0 = jax.random.normal(ks[5], (B, H, K, V))
  return q, k, v, beta, g, s0


@functools.partial(jax.jit, static_argnames=("backend", "gated"))
def _outputs_and_grads(q, k, v, beta, g, s0, do, ds, *, backend, gated, resets=None):
  def fn(q, k, v, beta, g, s0):
    g = g if gated else None
    if backend is None:
      return delta_chunked.delta_rule(q, k, v, beta, g, scale=0.3, initial_state=s0, chunk_size=C, resets=resets)
    return delta_chunked.delta_rule_kernel(q, k, v, beta, g, scale=0.3, initial_state=s0, chunk_size=C,
                                           interpret=True, backend=backend, resets=resets)

  (o, s), vjp = jax.vjp(fn, q, k, v, beta, g, s0)
  return o, s, vjp((do.astype(o.dtype), ds))


@pytest.mark.parametrize("backend,gated,packed", [("gpu", True, False), ("tpu", False, False), ("gpu", True, True)])
def test_kernel_path_equals_chunked_form(backend, gated, packed):
  """Packed: segment starts at 5, 16 (a chunk edge), 17 and 30, against the packed chunked form."""
  args = _inputs()
  cts = jax.random.normal(jax.random.key(9), (B, T, H, V)), jax.random.normal(jax.random.key(8), (B, H, K, V))
  resets = jnp.isin(jnp.arange(T), jnp.array([5, 16, 17, 30]))[None] if packed else None
  o, s, grads = _outputs_and_grads(*args, *cts, backend=backend, gated=gated, resets=resets)
  o_ref, s_ref, grads_ref = _outputs_and_grads(*args, *cts, backend=None, gated=gated, resets=resets)
  assert o.shape == (B, T, H, V) and s.dtype == jnp.float32
  assert_close(o, o_ref, 1e-5, "o")
  assert_close(s, s_ref, 1e-5, "final state")
  for name, a, b in zip(("dq", "dk", "dv", "dbeta", "dg", "ds0"), grads, grads_ref):
    if name == "dg" and not gated:
      continue
    assert_close(a, b, 1e-5, name)


def test_bfloat16_inputs_reach_the_kernel_and_stay_close():
  q, k, v, beta, g, s0 = _inputs(seed=1, dtype=jnp.bfloat16)
  o, s = jax.jit(functools.partial(delta_chunked.delta_rule_kernel, scale=0.3, chunk_size=C, interpret=True,
                                   backend="gpu"))(q, k, v, beta, g, initial_state=s0)
  f32 = lambda a: a.astype(jnp.float32)
  o_ref, s_ref = delta_chunked.delta_rule(f32(q), f32(k), f32(v), beta, g, scale=0.3, initial_state=s0,
                                          chunk_size=C)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  assert_close(o, o_ref, 3e-2, "bf16 o")
  assert_close(s, s_ref, 3e-2, "bf16 state")


def test_op_impl_pallas_equals_chunked():
  """On CPU the kernel call lowers to its reference loop: the op's pallas path runs end to end at any T."""
  q, k, v, beta, g, s0 = _inputs(seed=2)
  run = lambda impl: ops.delta_rule(q, k, v, beta, log_decay=g, initial_state=s0, return_state=True, chunk_size=C,
                                    impl=impl)
  (o, s), (o_ref, s_ref) = run("pallas"), run("chunked")
  assert_close(o, o_ref, 1e-5, "o")
  assert_close(s, s_ref, 1e-5, "final state")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_forward_and_backward_lower_with_the_kernel(platform):
  sds = jax.ShapeDtypeStruct
  q = sds((1, 256, 2, 64), jnp.bfloat16)
  v = sds((1, 256, 2, 64), jnp.bfloat16)
  beta, g = sds((1, 256, 2), jnp.float32), sds((1, 256, 2), jnp.float32)

  def loss(q, k, v, beta, g):
    o, s = delta_chunked.delta_rule_kernel(q, k, v, beta, g, scale=0.125, chunk_size=64)
    return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s)

  exported = jax.export.export(
      jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))), platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)])(q, q, v, beta, g)
  text = exported.mlir_module()
  assert text.count({"tpu": "tpu_custom_call", "cuda": "xla.gpu.triton"}[platform]) >= 3  # forward, dq, dk/dv
