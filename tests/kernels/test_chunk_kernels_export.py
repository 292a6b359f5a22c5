"""Every kernel configuration `impl="auto"` can pick lowers for TPU and CUDA through jax.export on CPU."""
import jax
import jax.numpy as jnp
import pytest

from mixers.kernels import chunked_recurrence, supports
from mixers.kernels.chunk_gpu import TRITON_CUSTOM_CALL

B, T, H, K, V, C = 1, 256, 2, 128, 128, 64
KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "xla.gpu.triton"}


def _loss(q, k, v, g, s0, decay, resets=None):
  o, s = chunked_recurrence(q, k, v, None if decay == "none" else g, scale=K**-0.5, initial_state=s0,
                            chunk_size=C, resets=resets)
  return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s)


def _export_step(platform, decay, *args):
  """The MLIR text of loss and gradients into q, k, v, g, s0, exported for `platform` only."""
  def step(q, k, v, g, s0, *resets):
    return jax.value_and_grad(_loss, argnums=(0, 1, 2, 3, 4))(q, k, v, g, s0, decay, *resets)

  exported = jax.export.export(
      jax.jit(step), platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)])(*args)
  assert exported.platforms == (platform,)
  return exported.mlir_module()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("decay", ["none", "scalar", "channel"])
def test_forward_and_backward_lower(platform, decay):
  sds = jax.ShapeDtypeStruct
  q = sds((B, T, H, K), jnp.bfloat16)
  v = sds((B, T, H, V), jnp.bfloat16)
  g = sds((B, T, H, K) if decay == "channel" else (B, T, H), jnp.float32)
  s0 = sds((B, H, K, V), jnp.float32)
  assert supports(q, q, v, None if decay == "none" else g, C, platform)
  text = _export_step(platform, decay, q, q, v, g, s0)
  assert text.count(KERNEL_CALL[platform]) >= 3  # forward, dq, dk/dv


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_packed_forward_and_backward_lower(platform):
  """With segment starts (packed sequences) the kernels, per-channel sub-chunk path included, lower too."""
  sds = jax.ShapeDtypeStruct
  q = sds((B, T, H, K), jnp.bfloat16)
  text = _export_step(platform, "channel", q, q, sds((B, T, H, V), jnp.bfloat16), sds((B, T, H, K), jnp.float32),
                      sds((B, H, K, V), jnp.float32), sds((B, T), jnp.bool_))
  assert text.count(KERNEL_CALL[platform]) >= 3
