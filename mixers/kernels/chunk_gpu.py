"""GPU (Pallas on Triton) kernels for the chunked gated linear recurrence: forward, dq, dk/dv/dS0.

Grid `(batch*heads, V / Vb)`: every program owns one (batch, head) and one block of value columns and walks
the chunks in a loop inside the kernel, carrying its float32 state block `[K, Vb]` (or its gradient) in
registers, so the state never goes back to HBM between chunks. The recurrence is independent per value
column, so value blocks parallelise it exactly; dq and dk are sums over value blocks and come back as
per-block partials `[V/Vb, BH, T, K]` that `backward` adds up. The math per chunk lives in `chunk_math`,
shared with the TPU kernels.

Why Triton rather than Mosaic GPU, although Mosaic GPU is where Pallas on Hopper is heading: in this JAX
(0.10) Mosaic GPU has no lowering for a plain `dot_general` on values; every matmul is a `wgmma` on
swizzled shared-memory refs with explicit accumulators and fences. A chunk step here has six to nine
matmuls, most of them on operands computed in registers (decay-weighted keys, masked score tiles), each of
which would need its own shared-memory staging; that kernel cannot be checked numerically without a Hopper
GPU (its interpreter does not cover wgmma), and it would not run on Ampere. The Triton path lowers the same
`jnp`-level chunk math that the TPU kernel uses, runs in interpret mode on CPU, and `jax.export` lowers it
for `cuda` on a CPU machine. Whether a Mosaic GPU port pays has not been measured (no GPU was available);
`experiments/benchmarks/kernels_gpu.py` is the measurement to make before writing one.

Packed sequences add one operand, the in-chunk segment counter `r` `[BH,T,1]` (float32), read like g.

Constraints (`supports_gpu`): C a power of two in [16, 128], K and V padded to powers of two >= 16 by the
caller, K <= 256.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from mixers.kernels import chunk_math

TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


def is_pow2(x):
  return x >= 1 and x & (x - 1) == 0


def padded_width(d):
  return max(16, 1 << (d - 1).bit_length())


def value_block(dv):
  return min(dv, 64)


def supports_gpu(t, dk, dv, chunk_size, dtype, per_channel):
  """Shape constraints of the GPU kernels (dk, dv before padding)."""
  del dv, per_channel
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                              jnp.dtype(jnp.float16)):
    return False
  if not is_pow2(chunk_size) or not 16 <= chunk_size <= 128 or t % chunk_size:
    return False
  return padded_width(dk) <= 256


def _params(num_warps=4):
  return pl_triton.CompilerParams(num_warps=num_warps, num_stages=1)


def _specs(t, dk, bv, per_channel, n):
  seq = lambda d, group=1: pl.BlockSpec((None, t, d), chunk_math.group_rows(lambda b, j: (b, 0, 0), group))
  val = pl.BlockSpec((None, t, bv), lambda b, j: (b, 0, j))
  g = seq(dk if per_channel else 1)
  if per_channel:
    aux = pl.BlockSpec((None, n * dk, 1), lambda b, j: (b, 0, 0))
  else:
    aux = pl.BlockSpec((None, 1, t), lambda b, j: (b, 0, 0))
  state = pl.BlockSpec((None, dk, bv), lambda b, j: (b, 0, j))
  return seq, val, g, aux, state


def _chunk(q, k, v, g, aux, r, i, *, chunk, dk, per_channel, dtype):
  return chunk_math.Chunk(
      q=q, k=k, v=v, g=g, g_row=None if per_channel else aux, g_tot=aux if per_channel else None,
      base=i * chunk, tot_base=i * dk, size=chunk, sub=16, per_channel=per_channel, dtype=dtype, r=r)


@functools.partial(jax.jit, static_argnames=("scale", "chunk", "per_channel", "interpret", "group"))
def forward(q, k, v, g, g_aux, s0, *, scale, chunk, per_channel, interpret=False, r=None, group=1):
  """Returns (o `[BH,T,V]`, final state `[BH,K,V]` float32); r: None or the segment counter `[BH,T,1]`.
  q, k `[BH/group,T,K]`: row bh of v reads row bh // group of q and k."""
  t, dk = q.shape[1:]
  bh = v.shape[0]
  dv = v.shape[-1]
  bv, n = value_block(dv), t // chunk

  def kernel(*refs):
    q_ref, k_ref, v_ref, g_ref, aux_ref, r_ref, s0_ref, o_ref, st_ref = chunk_math.optional_ref(refs, r, 5)

    def step(i, s):
      c = _chunk(q_ref, k_ref, v_ref, g_ref, aux_ref, r_ref, i, chunk=chunk, dk=dk,
                 per_channel=per_channel, dtype=q.dtype)
      return chunk_math.forward_chunk(c, s, o_ref, scale=scale)
    st_ref[...] = lax.fori_loop(0, n, step, s0_ref[...].astype(jnp.float32))

  seq, val, g_spec, aux_spec, state = _specs(t, dk, bv, per_channel, n)
  return pl.pallas_call(
      kernel,
      grid=(bh, dv // bv),
      in_specs=chunk_math.with_optional(r, [seq(dk, group), seq(dk, group), val, g_spec, aux_spec, state], seq(1),
                                        at=5),
      out_specs=[val, state],
      out_shape=[jax.ShapeDtypeStruct((bh, t, dv), q.dtype),
                 jax.ShapeDtypeStruct((bh, dk, dv), jnp.float32)],
      compiler_params=_params(),
      interpret=interpret,
      name="chunk_recurrence_fwd",
  )(*chunk_math.with_optional(r, [q, k, v, g, g_aux, s0], r, at=5))


@functools.partial(jax.jit, static_argnames=("scale", "chunk", "per_channel", "interpret", "group"))
def backward(q, k, v, g, g_aux, s0, do, ds_final, *, scale, chunk, per_channel, interpret=False, r=None, group=1):
  """Returns (dq, dk `[BH,T,K]` float32 per head (summed over a group by the caller), dv `[BH,T,V]` float32,
  dS0 `[BH,K,V]` float32)."""
  t, dk = q.shape[1:]
  bh = v.shape[0]
  dv = v.shape[-1]
  bv, n = value_block(dv), t // chunk
  nvb = dv // bv
  f32 = jnp.float32
  seq, val, g_spec, aux_spec, state = _specs(t, dk, bv, per_channel, n)
  partial_spec = pl.BlockSpec((None, None, t, dk), lambda b, j: (j, b, 0, 0))
  partial_shape = jax.ShapeDtypeStruct((nvb, bh, t, dk), f32)

  def dq_kernel(*refs):
    k_ref, v_ref, g_ref, aux_ref, r_ref, s0_ref, do_ref, dq_ref = chunk_math.optional_ref(refs, r, 4)

    def step(i, s):
      c = _chunk(None, k_ref, v_ref, g_ref, aux_ref, r_ref, i, chunk=chunk, dk=dk,
                 per_channel=per_channel, dtype=q.dtype)
      return chunk_math.dq_chunk(c, s, do_ref, dq_ref, scale=scale)
    lax.fori_loop(0, n, step, s0_ref[...].astype(f32))

  def dkdv_kernel(*refs):
    q_ref, k_ref, v_ref, g_ref, aux_ref, r_ref, do_ref, dsf_ref, dk_ref, dv_ref, ds0_ref = (
        chunk_math.optional_ref(refs, r, 5))

    def step(i, ds):
      c = _chunk(q_ref, k_ref, v_ref, g_ref, aux_ref, r_ref, n - 1 - i, chunk=chunk, dk=dk,
                 per_channel=per_channel, dtype=q.dtype)
      return chunk_math.dkdv_chunk(c, ds, do_ref, dk_ref, dv_ref, scale=scale)
    ds0_ref[...] = lax.fori_loop(0, n, step, dsf_ref[...].astype(f32))

  dq = pl.pallas_call(
      dq_kernel,
      grid=(bh, nvb),
      in_specs=chunk_math.with_optional(r, [seq(dk, group), val, g_spec, aux_spec, state, val], seq(1), at=4),
      out_specs=partial_spec,
      out_shape=partial_shape,
      compiler_params=_params(),
      interpret=interpret,
      name="chunk_recurrence_bwd_dq",
  )(*chunk_math.with_optional(r, [k, v, g, g_aux, s0, do], r, at=4))
  dk_, dv_, ds0 = pl.pallas_call(
      dkdv_kernel,
      grid=(bh, nvb),
      in_specs=chunk_math.with_optional(r, [seq(dk, group), seq(dk, group), val, g_spec, aux_spec, val, state],
                                        seq(1), at=5),
      out_specs=[partial_spec, val, state],
      out_shape=[partial_shape, jax.ShapeDtypeStruct((bh, t, dv), f32),
                 jax.ShapeDtypeStruct((bh, dk, dv), f32)],
      compiler_params=_params(),
      interpret=interpret,
      name="chunk_recurrence_bwd_dkdv",
  )(*chunk_math.with_optional(r, [q, k, v, g, g_aux, do, ds_final], r, at=5))
  return dq.sum(0), dk_.sum(0), dv_, ds0
