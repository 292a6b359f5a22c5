"""Every kernel configuration `impl="auto"` can pick lowers for TPU and CUDA through jax.export on CPU."""
import jax
import jax.numpy as jnp
import pytest

from mixers.kernels import chunked_recurrence, supports
from mixers.kernels.chunk_gpu import TRITON_CUSTOM_CALL

B, T, H, K, V, C = 1, 256, 2, 128, 128, 64
KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "xla.gpu.triton"}


def _loss(q, k, v, g, s0, decay):
  o, s = chunked_recurrence(q, k, v, None if decay == "none" else g, scale=K**-0.5, initial_state=s0,
                            chunk_size=C)
  return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("decay", ["none", "scalar", "channel"])
def test_forward_and_backward_lower(platform, decay):
  sds = jax.ShapeDtypeStruct
  q = sds((B, T, H, K), jnp.bfloat16)
  v = sds((B, T, H, V), jnp.bfloat16)
  g = sds((B, T, H, K) if decay == "channel" else (B, T, H), jnp.float32)
  s0 = sds((B, H, K, V), jnp.float32)
  assert supports(q, q, v, None if decay == "none" else g, C, platform)

  def step(q, k, v, g, s0):
    loss, grads = jax.value_and_grad(_loss, argnums=(0, 1, 2, 3, 4))(q, k, v, g, s0, decay)
    return loss, grads

  exported = jax.export.export(
      jax.jit(step), platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)])(
          q, q, v, g, s0)
  text = exported.mlir_module()
  assert text.count(KERNEL_CALL[platform]) >= 3  # forward, dq, dk/dv
  assert exported.platforms == (platform,)
