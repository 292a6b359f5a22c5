"""The kernel path of the gated linear recurrence (interpret mode): any T, `exclusive` by shifted inputs, mixed dtypes;
and `impl="auto"` choosing the kernel when a bf16 layer of every family is lowered for CUDA or TPU on this CPU."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixers
from mixers.kernels.chunk_gpu import TRITON_CUSTOM_CALL
from mixers.ops.recurrence import chunked, gated_linear_recurrence, kernel_path, lower_kernels_for
from tests.conftest import assert_close

B, H, K, V, C = 2, 2, 12, 20, 16
SCALE = 0.4
KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "xla.gpu.triton"}


def _inputs(t, decay, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  q, k = (jax.random.normal(x, (B, t, H, K)) for x in ks[:2])
  v = jax.random.normal(ks[2], (B, t, H, V))
  g = None if decay == "none" else -jax.random.uniform(ks[3], (B, t, H, K) if decay == "channel" else (B, t, H))
  s0 = jax.random.normal(ks[4], (B, H, K, V))
  cotangents = jax.random.normal(ks[5], (B, t, H, V)), jax.random.normal(ks[6], (B, H, K, V))
  return (q, k, v, g, s0), cotangents


def _resets(t):
  """Segment starts at 5 and at the 16-token chunk edge in row 0, at t - 1 (the last token) in row 1."""
  r = np.zeros((B, t), bool)
  r[0, [5, C]] = True
  r[1, t - 1] = True
  return jnp.asarray(r)


@functools.partial(jax.jit, static_argnames=("backend", "exclusive", "chunk"))
def _kernel_and_chunked(args, cotangents, resets, *, backend, exclusive, chunk=C):
  """[(o, state, d inputs) of the kernel path, the same of the chunked form], one program."""
  kw = dict(scale=SCALE, chunk_size=chunk, exclusive=exclusive, resets=resets)
  forms = (functools.partial(kernel_path.recurrence, backend=backend, interpret=True, **kw),
           functools.partial(chunked.recurrence, **kw))
  results = []
  for form in forms:
    fn = lambda q, k, v, g, s0: form(q, k, v, g, initial_state=s0)  # pylint: disable=cell-var-from-loop
    (o, s), vjp = jax.vjp(fn, *args)
    results.append((o, s) + vjp(cotangents))
  return results


@pytest.mark.parametrize("backend,decay,t,exclusive,packed,chunk", [
    ("gpu", "channel", 37, True, True, C),   # exclusive, packed, T not a multiple of the chunk, per-channel decay
    ("gpu", "channel", 70, False, True, 32),  # chunks of 2 sub-chunks: the per-channel off-diagonal blocks
    ("tpu", "scalar", 40, True, False, C),    # exclusive with a scalar decay
    ("gpu", "none", 23, False, True, C),      # inclusive, padded, no decay
])
def test_kernel_path_equals_chunked_form_with_gradients(backend, decay, t, exclusive, packed, chunk):
  args, cotangents = _inputs(t, decay)
  if decay == "none":
    args = args[:3] + (jnp.zeros((B, t, H)),) + args[4:]  # a zero log-decay: the same recurrence, a gradient to read
  kernel, reference = _kernel_and_chunked(args, cotangents, _resets(t) if packed else None, backend=backend,
                                          exclusive=exclusive, chunk=chunk)
  for name, a, b in zip(("o", "state", "dq", "dk", "dv", "dg", "ds0"), kernel, reference):
    assert_close(a, b, 1e-4, name)


def test_mixed_dtypes_run_the_kernel_in_q_and_k_dtype():
  """bf16 q, k with float32 values (Mamba2's dt * x): v goes in as bf16, o comes back float32."""
  (q, k, v, g, s0), _ = _inputs(32, "scalar")
  q16, k16 = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
  run = jax.jit(lambda *a: (kernel_path.recurrence(*a, scale=SCALE, chunk_size=C, initial_state=s0, backend="gpu",
                                                   interpret=True),
                            chunked.recurrence(*a[:2], a[2].astype(jnp.bfloat16), a[3], scale=SCALE, chunk_size=C,
                                               initial_state=s0)))
  (o, s), (o_ref, s_ref) = run(q16, k16, v, g)
  assert o.dtype == jnp.float32 and s.dtype == jnp.float32
  assert_close(o, o_ref, 2e-2, "o")
  assert_close(s, s_ref, 2e-2, "state")


def test_auto_is_the_chunked_form_on_cpu_and_has_forward_mode():
  (q, k, v, g, s0), _ = _inputs(37, "channel")
  run = jax.jit(lambda impl: gated_linear_recurrence(q, k, v, g, scale=SCALE, initial_state=s0, chunk_size=C,
                                                     exclusive=True, impl=impl), static_argnums=0)
  for a, b in zip(run("auto"), run("chunked")):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # No kernel branch is traced without a local GPU/TPU, so forward-mode autodiff works.
  tangent = jax.jvp(lambda x: gated_linear_recurrence(x, k, v, g, chunk_size=C)[0], (q,), (q,))[1]
  assert bool(jnp.all(jnp.isfinite(tangent)))


# Every family whose core is the gated linear recurrence (and the delta rule's WY form, whose passes run on it), as a
# bf16 layer (causal unless it is non-causal only).
FAMILIES = {"gla": {}, "retention": {}, "linear_attention": {}, "mamba2": {"head_dim": 16},
            "hydra": {"head_dim": 16}, "lightnet": {}, "delta_net": {}, "gated_delta_net": {}}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_bf16_layers_of_every_family_lower_to_the_kernel(platform):
  """Exported on this CPU for `platform` (offered with `lower_kernels_for`), `impl="auto"` layers call the kernel
  forward and backward: at least three kernel calls (forward, dq, dk/dv) per recurrence in value_and_grad. T = 40 is
  not a multiple of the chunk."""
  x = jax.ShapeDtypeStruct((1, 40, 64), jnp.bfloat16)
  missing = {}
  for name, kwargs in FAMILIES.items():
    model = mixers.build_mixer(name, dtype=jnp.bfloat16, **kwargs)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    loss = lambda p, u, m=model: jnp.sum(m.apply(p, u).astype(jnp.float32) ** 2)
    with lower_kernels_for(platform):
      exported = jax.export.export(
          jax.jit(jax.value_and_grad(loss)), platforms=[platform],
          disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)])(params, x)
    calls = exported.mlir_module().count(KERNEL_CALL[platform])
    if calls < 3:
      missing[name] = calls
  assert not missing, f"layers with fewer than 3 kernel calls when lowered for {platform}: {missing}"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_ssd_kernel_reads_b_and_c_by_group(monkeypatch, backend):
  """SSD with 4 heads over 2 groups through the interpreted kernel: B and C reach it as 2 groups (no broadcast to
  heads) and the outputs, final state and gradients equal the grouped chunked form; T = 37 is padded inside."""
  from mixers import kernels, ops  # pylint: disable=import-outside-toplevel
  operand_heads = []
  original = kernels.chunked_recurrence

  def interpreted(q, k, v, *args, **kwargs):
    operand_heads.append((q.shape[2], v.shape[2]))
    return original(q, k, v, *args, **{**kwargs, "interpret": True, "backend": backend})

  monkeypatch.setattr(kernels, "chunked_recurrence", interpreted)
  t, h, g, p, n = 37, 4, 2, 6, 8
  ks = jax.random.split(jax.random.PRNGKey(5), 7)
  x = jax.random.normal(ks[0], (B, t, h, p))
  dt = jax.nn.softplus(jax.random.normal(ks[1], (B, t, h)))
  a = -jnp.exp(jax.random.normal(ks[2], (h,)))
  bc = jax.random.normal(ks[3], (2, B, t, g, n))
  s0 = jax.random.normal(ks[4], (B, h, p, n))
  cotangents = jax.random.normal(ks[5], (B, t, h, p)), jax.random.normal(ks[6], (B, h, p, n))

  @jax.jit
  def forms(x, dt, a, bc, s0):
    results = []
    for impl in ("pallas", "chunked"):
      fn = lambda x, dt, a, bc, s0: ops.ssd(x, dt, a, bc[0], bc[1], chunk_size=C, initial_state=s0,  # pylint: disable=cell-var-from-loop
                                            return_state=True, impl=impl)
      out, vjp = jax.vjp(fn, x, dt, a, bc, s0)
      results.append(out + vjp(cotangents))
    return results

  kernel, reference = forms(x, dt, a, bc, s0)
  assert operand_heads and all(heads == (g, h) for heads in operand_heads), operand_heads
  for name, u, w in zip(("y", "state", "dx", "ddt", "dA", "dBC", "ds0"), kernel, reference):
    assert_close(u, w, 1e-4, name)


@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_tpu_kernel_walks_several_chunks_per_grid_step(monkeypatch, decay):
  """TPU blocks of 2 chunks (BLOCK_TOKENS lowered to 32 for T = 64, chunks of 16: 2 grid steps of 2 chunks), packed,
  exclusive reads: equal to the chunked form, outputs, state and gradients."""
  from mixers.kernels import chunk_tpu  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(chunk_tpu, "BLOCK_TOKENS", 2 * C)
  assert chunk_tpu.chunks_per_step(64, C) == 2
  args, cotangents = _inputs(64, decay, seed=2)
  kernel, reference = _kernel_and_chunked(args, cotangents, _resets(64), backend="tpu", exclusive=True)
  for name, a, b in zip(("o", "state", "dq", "dk", "dv", "dg", "ds0"), kernel, reference):
    assert_close(a, b, 1e-4, name)


def test_tpu_grid_steps_per_head():
  """Blocks of up to 512 tokens: T = 8192 in chunks of 64 takes 16 grid steps per head (8 chunks each), not 128."""
  from mixers.kernels import chunk_tpu  # pylint: disable=import-outside-toplevel
  assert [chunk_tpu.chunks_per_step(t, 64) for t in (8192, 640, 704, 64)] == [8, 5, 1, 1]
  assert chunk_tpu.chunks_per_step(8192, 128) == 4 and chunk_tpu.chunks_per_step(48, 16) == 3


def test_tpu_chunk_follows_the_generation():
  """The TPU kernel's chunk under impl="auto" grows to the MXU's width (128 to v5, 256 from v6e) unless padding T to
  it costs more than T/16 tokens over the caller's chunk."""
  from mixers.kernels import chunk_tpu  # pylint: disable=import-outside-toplevel
  widths = {kind: chunk_tpu.mxu_width(kind) for kind in ("TPU v4", "TPU v5 lite", "TPU v5p", "TPU v6 lite", "TPU7x",
                                                          None)}
  assert widths == {"TPU v4": 128, "TPU v5 lite": 128, "TPU v5p": 128, "TPU v6 lite": 256, "TPU7x": 256, None: 128}
  chunks = [chunk_tpu.preferred_chunk(t, 64, "TPU v6 lite") for t in (8192, 4100, 1000, 300, 40)]
  assert chunks == [256, 256, 256, 64, 64]
  assert chunk_tpu.preferred_chunk(8192, 64, "TPU v5 lite") == 128
  assert chunk_tpu.preferred_chunk(8192, 512, "TPU v6 lite") == 512


@pytest.mark.parametrize("platform,kind,want", [("tpu", "TPU v6 lite", 256), ("tpu", "TPU v5 lite", 128),
                                                ("cuda", "TPU v6 lite", C)])
def test_auto_lowers_the_kernel_in_the_platform_chunk(monkeypatch, platform, kind, want):
  """Exported for `platform` from this CPU, the recurrence and SSD's scan call the kernel in the chunk
  `kernel_chunk_size` gives for the target set by `lower_kernels_for(tpu_kind=...)`; on cuda the caller's."""
  from mixers import kernels, ops  # pylint: disable=import-outside-toplevel
  seen = []
  original = kernels.chunked_recurrence

  def recording(*args, chunk_size, **kwargs):
    seen.append(chunk_size)
    return original(*args, chunk_size=chunk_size, **kwargs)

  monkeypatch.setattr(kernels, "chunked_recurrence", recording)
  t = 512
  q = jax.ShapeDtypeStruct((1, t, 2, 32), jnp.bfloat16)
  g = jax.ShapeDtypeStruct((1, t, 2), jnp.float32)
  x, bc = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.bfloat16), jax.ShapeDtypeStruct((1, t, 1, 32), jnp.bfloat16)
  a = jax.ShapeDtypeStruct((2,), jnp.float32)
  glr = lambda q, g: gated_linear_recurrence(q, q, q, g, chunk_size=C)[0]
  ssd = lambda x, dt, a, bc: ops.ssd(x, dt, a, bc, bc, chunk_size=C)
  with lower_kernels_for(platform, tpu_kind=kind):
    for fn, args in ((glr, (q, g)), (ssd, (x, g, a, bc))):
      jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=[
          jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)])(*args)
  assert seen == [want, want]
