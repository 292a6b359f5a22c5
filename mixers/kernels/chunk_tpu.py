"""TPU (Mosaic) kernels for the chunked gated linear recurrence: forward, dq, and dk/dv/dS0.

Grid `(batch*heads, blocks)`: the head axis is parallel (split across TensorCores), the block axis is
sequential ("arbitrary") and carries the float32 state `[K, V]` (or its gradient) in a VMEM scratch
buffer, so the state never leaves the chip between blocks. Each grid step sees a block of m chunks (up to
BLOCK_TOKENS tokens, `chunks_per_step`), `[m C, K]` / `[m C, V]` tiles, and walks its chunks in a loop, so a
step's fixed cost is paid once per m chunks (T=8192 in chunks of 64: 16 steps per head instead of 128); the math
per chunk lives in `chunk_math`. Layout constraints (checked by `supports_tpu`): K and V
are padded to multiples of 128 by the caller (lanes), C is a multiple of 8 (16 for 16-bit inputs;
sublanes). Inputs are pre-arranged by `dispatch`: q, k `[BH,T,K]`, v `[BH,T,V]`, within-chunk cumulative
log decay g `[BH,T,K]` or `[BH,T,1]`, plus `g_row` `[BH,n,1,C]` (scalar) or `g_tot` `[BH,n*K,1]`
(per channel), and for packed sequences the in-chunk segment counter `r` `[BH,T,1]` (float32), tiled like g.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mixers.kernels import chunk_math

LANES = 128
BLOCK_TOKENS = 512  # tokens per grid step at most (a block of whole chunks)


def sublane_multiple(dtype):
  return 8 * (4 // jnp.dtype(dtype).itemsize)


def supports_tpu(t, dk, dv, chunk_size, dtype, per_channel):
  """Shape constraints of the TPU kernels (dk, dv before lane padding)."""
  del per_channel
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    return False
  if chunk_size % sublane_multiple(dtype) or t % chunk_size or not 8 <= chunk_size <= 256:
    return False
  return dk <= 512 and dv <= 512


def chunks_per_step(t, chunk):
  """m: the most chunks per grid step that divide the T / chunk chunks within BLOCK_TOKENS tokens (at least 1)."""
  n = t // chunk
  return max(m for m in range(1, n + 1) if n % m == 0 and (m == 1 or m * chunk <= BLOCK_TOKENS))


def _sub_size(chunk):
  return 16 if chunk % 16 == 0 else 8


def _decay_specs(per_channel, chunk, m, dk, tile):
  """BlockSpecs for g and its auxiliary array; `tile(i)` is the block index of grid step i."""
  width = dk if per_channel else 1
  g_spec = pl.BlockSpec((None, m * chunk, width), lambda bh, i: (bh, tile(i), 0))
  if per_channel:
    aux_spec = pl.BlockSpec((None, m * dk, 1), lambda bh, i: (bh, tile(i), 0))
  else:
    aux_spec = pl.BlockSpec((None, m, 1, chunk), lambda bh, i: (bh, tile(i), 0, 0))
  return g_spec, aux_spec


def _chunk(q, k, v, g, aux, r, j, *, chunk, dk, per_channel, dtype):
  """Chunk j of the grid step's block (the scalar decay's g_row: that chunk's `[1, C]` row of aux)."""
  return chunk_math.Chunk(
      q=q, k=k, v=v, g=g, g_row=None if per_channel else aux.at[j], g_tot=aux if per_channel else None,
      base=pl.multiple_of(j * chunk, chunk), tot_base=pl.multiple_of(j * dk, dk), size=chunk, sub=_sub_size(chunk),
      per_channel=per_channel, dtype=dtype, r=r, row_base=0)


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


@functools.partial(jax.jit, static_argnames=("scale", "chunk", "per_channel", "interpret", "group"))
def forward(q, k, v, g, g_aux, s0, *, scale, chunk, per_channel, interpret=False, r=None, group=1):
  """Returns (o `[BH,T,V]`, final state `[BH,K,V]` float32); r: None or the segment counter `[BH,T,1]`.
  q, k `[BH/group,T,K]`: row bh of v reads row bh // group of q and k."""
  t, dk = q.shape[1:]
  bh = v.shape[0]
  dv = v.shape[-1]
  m = chunks_per_step(t, chunk)
  steps = t // (m * chunk)

  def kernel(*refs):
    q_ref, k_ref, v_ref, g_ref, aux_ref, r_ref, s0_ref, o_ref, st_ref, s_scr = chunk_math.optional_ref(refs, r, 5)
    i = pl.program_id(1)

    @pl.when(i == 0)
    def _():
      s_scr[...] = s0_ref[...]

    def step(j, s):
      c = _chunk(q_ref, k_ref, v_ref, g_ref, aux_ref, r_ref, j, chunk=chunk, dk=dk, per_channel=per_channel,
                 dtype=q.dtype)
      return chunk_math.forward_chunk(c, s, o_ref, scale=scale)
    s_scr[...] = lax.fori_loop(0, m, step, s_scr[...])

    @pl.when(i == steps - 1)
    def _():
      st_ref[...] = s_scr[...]

  g_spec, aux_spec = _decay_specs(per_channel, chunk, m, dk, lambda i: i)
  row = lambda d, group=1: pl.BlockSpec((None, m * chunk, d), chunk_math.group_rows(lambda b, i: (b, i, 0), group))
  state = pl.BlockSpec((None, dk, dv), lambda b, i: (b, 0, 0))
  return pl.pallas_call(
      kernel,
      grid=(bh, steps),
      in_specs=chunk_math.with_optional(r, [row(dk, group), row(dk, group), row(dv), g_spec, aux_spec, state],
                                        row(1), at=5),
      out_specs=[row(dv), state],
      out_shape=[jax.ShapeDtypeStruct((bh, t, dv), q.dtype),
                 jax.ShapeDtypeStruct((bh, dk, dv), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
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
  m = chunks_per_step(t, chunk)
  steps = t // (m * chunk)
  f32 = jnp.float32
  chunk_at = functools.partial(_chunk, chunk=chunk, dk=dk, per_channel=per_channel, dtype=q.dtype)

  def dq_kernel(*refs):
    k_ref, v_ref, g_ref, aux_ref, r_ref, s0_ref, do_ref, dq_ref, s_scr = chunk_math.optional_ref(refs, r, 4)

    @pl.when(pl.program_id(1) == 0)
    def _():
      s_scr[...] = s0_ref[...]

    def step(j, s):
      return chunk_math.dq_chunk(chunk_at(None, k_ref, v_ref, g_ref, aux_ref, r_ref, j), s, do_ref, dq_ref,
                                 scale=scale)
    s_scr[...] = lax.fori_loop(0, m, step, s_scr[...])

  def dkdv_kernel(*refs):
    q_ref, k_ref, v_ref, g_ref, aux_ref, r_ref, do_ref, dsf_ref, dk_ref, dv_ref, ds0_ref, ds_scr = (
        chunk_math.optional_ref(refs, r, 5))
    i = pl.program_id(1)

    @pl.when(i == 0)
    def _():
      ds_scr[...] = dsf_ref[...]

    def step(j, ds):  # the block's chunks from the last to the first
      c = chunk_at(q_ref, k_ref, v_ref, g_ref, aux_ref, r_ref, m - 1 - j)
      return chunk_math.dkdv_chunk(c, ds, do_ref, dk_ref, dv_ref, scale=scale)
    ds_scr[...] = lax.fori_loop(0, m, step, ds_scr[...])

    @pl.when(i == steps - 1)
    def _():
      ds0_ref[...] = ds_scr[...]

  state = pl.BlockSpec((None, dk, dv), lambda b, i: (b, 0, 0))
  scratch = [pltpu.VMEM((dk, dv), f32)]

  fwd_row = lambda d, group=1: pl.BlockSpec((None, m * chunk, d), chunk_math.group_rows(lambda b, i: (b, i, 0),
                                                                                          group))
  g_spec, aux_spec = _decay_specs(per_channel, chunk, m, dk, lambda i: i)
  dq = pl.pallas_call(
      dq_kernel,
      grid=(bh, steps),
      in_specs=chunk_math.with_optional(r, [fwd_row(dk, group), fwd_row(dv), g_spec, aux_spec, state, fwd_row(dv)],
                                        fwd_row(1), at=4),
      out_specs=fwd_row(dk),
      out_shape=jax.ShapeDtypeStruct((bh, t, dk), f32),
      scratch_shapes=scratch,
      compiler_params=_params(),
      interpret=interpret,
      name="chunk_recurrence_bwd_dq",
  )(*chunk_math.with_optional(r, [k, v, g, g_aux, s0, do], r, at=4))

  rev_row = lambda d, group=1: pl.BlockSpec((None, m * chunk, d), chunk_math.group_rows(
      lambda b, i: (b, steps - 1 - i, 0), group))
  g_spec, aux_spec = _decay_specs(per_channel, chunk, m, dk, lambda i: steps - 1 - i)
  dk_, dv_, ds0 = pl.pallas_call(
      dkdv_kernel,
      grid=(bh, steps),
      in_specs=chunk_math.with_optional(
          r, [rev_row(dk, group), rev_row(dk, group), rev_row(dv), g_spec, aux_spec, rev_row(dv), state], rev_row(1),
          at=5),
      out_specs=[rev_row(dk), rev_row(dv), state],
      out_shape=[jax.ShapeDtypeStruct((bh, t, dk), f32), jax.ShapeDtypeStruct((bh, t, dv), f32),
                 jax.ShapeDtypeStruct((bh, dk, dv), f32)],
      scratch_shapes=scratch,
      compiler_params=_params(),
      interpret=interpret,
      name="chunk_recurrence_bwd_dkdv",
  )(*chunk_math.with_optional(r, [q, k, v, g, g_aux, do, ds_final], r, at=5))
  return dq, dk_, dv_, ds0
