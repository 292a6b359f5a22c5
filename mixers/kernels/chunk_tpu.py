"""TPU (Mosaic) kernels for the chunked gated linear recurrence: forward, dq, and dk/dv/dS0.

Grid `(batch*heads, V / Vb, blocks)`: the head and value-tile axes are parallel (split across TensorCores: the
recurrence is independent per value column), the block axis is sequential ("arbitrary") and carries the float32
state `[K, Vb]` (or its gradient) in a VMEM scratch buffer, so the state never leaves the chip between blocks. Value
tiles are 128 lanes (`value_tile`) when V is wider; each tile recomputes the chunk's scores (C x C x K), and dq and
dk, sums over V, come back as per-tile partials that `backward` adds up. Each grid step sees a block of m chunks (up to
BLOCK_TOKENS tokens, `chunks_per_step`), `[m C, K]` / `[m C, V]` tiles, and walks its chunks in a loop, so a
step's fixed cost is paid once per m chunks (T=8192 in chunks of 64: 16 steps per head instead of 128); the math
per chunk lives in `chunk_math`. Layout constraints (checked by `supports_tpu`): K and V
are padded to multiples of 128 by the caller (lanes), C is a multiple of 8 (16 for 16-bit inputs;
sublanes). Inputs are pre-arranged by `dispatch`: q, k `[BH,T,K]`, v `[BH,T,V]`, within-chunk cumulative
log decay g `[BH,T,K]` or `[BH,T,1]`, plus `g_row` `[BH,n,1,C]` (scalar) or `g_tot` `[BH,n*K,1]`
(per channel), and for packed sequences the in-chunk segment counter `r` `[BH,T,1]` (float32), tiled like g.
"""
import functools
import re

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mixers.kernels import chunk_math
from mixers.ops.recurrence.kernel_path import padded_length

LANES = 128
BLOCK_TOKENS = 512  # tokens per grid step at most (a block of whole chunks)


def mxu_width(device_kind):
  """Rows of a TPU generation's matrix unit, from its `device_kind` ("TPU v5 lite", "TPU v6 lite", "TPU7x"): 256
  from v6e (Trillium) on, 128 on v2-v5p and when the generation is unknown (None: no TPU attached)."""
  found = re.search(r"tpu\s*v?(\d+)", (device_kind or "").lower())
  return 256 if found and int(found.group(1)) >= 6 else 128


def preferred_chunk(t, chunk_size, device_kind):
  """The chunk `impl="auto"` runs the TPU kernels in: the largest of chunk_size, 2 chunk_size, ... up to the
  generation's MXU width (`mxu_width`; the chunk is the contraction and row dimension of every chunk matmul) whose
  zero-padding of T adds no more than T/16 tokens over chunk_size's; chunk_size when it is already wider."""
  fits = lambda c: padded_length(t, c) <= padded_length(t, chunk_size) + t // 16
  best, c = chunk_size, 2 * chunk_size
  while c <= mxu_width(device_kind):
    if fits(c):
      best = c
    c *= 2
  return best


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


def value_tile(dv):
  """Vb: the value columns of one grid program (a multiple of 128 lanes, dv when it is no wider)."""
  return min(dv, LANES)


def chunks_per_step(t, chunk):
  """m: the most chunks per grid step that divide the T / chunk chunks within BLOCK_TOKENS tokens (at least 1)."""
  n = t // chunk
  return max(m for m in range(1, n + 1) if n % m == 0 and (m == 1 or m * chunk <= BLOCK_TOKENS))


def _sub_size(chunk):
  return 16 if chunk % 16 == 0 else 8


def _decay_specs(per_channel, chunk, m, dk, tile):
  """BlockSpecs for g and its auxiliary array; `tile(i)` is the block index of grid step i."""
  width = dk if per_channel else 1
  g_spec = pl.BlockSpec((None, m * chunk, width), lambda bh, j, i: (bh, tile(i), 0))
  if per_channel:
    aux_spec = pl.BlockSpec((None, m * dk, 1), lambda bh, j, i: (bh, tile(i), 0))
  else:
    aux_spec = pl.BlockSpec((None, m, 1, chunk), lambda bh, j, i: (bh, tile(i), 0, 0))
  return g_spec, aux_spec


def _row_specs(m, chunk, tile, group):
  """(keys(d): q/k rows by group, values(d): rows of a value tile, partial(d): per-tile partial rows, segments: the
  segment counter's rows) for block `tile(i)` on grid (BH, V/Vb, blocks)."""
  keys = lambda d: pl.BlockSpec((None, m * chunk, d), chunk_math.group_rows(lambda b, j, i: (b, tile(i), 0), group))
  values = lambda d: pl.BlockSpec((None, m * chunk, d), lambda b, j, i: (b, tile(i), j))
  partial = lambda d: pl.BlockSpec((None, None, m * chunk, d), lambda b, j, i: (j, b, tile(i), 0))
  segments = pl.BlockSpec((None, m * chunk, 1), lambda b, j, i: (b, tile(i), 0))
  return keys, values, partial, segments


def _chunk(q, k, v, g, aux, r, j, *, chunk, dk, per_channel, dtype):
  """Chunk j of the grid step's block (the scalar decay's g_row: that chunk's `[1, C]` row of aux)."""
  return chunk_math.Chunk(
      q=q, k=k, v=v, g=g, g_row=None if per_channel else aux.at[j], g_tot=aux if per_channel else None,
      base=pl.multiple_of(j * chunk, chunk), tot_base=pl.multiple_of(j * dk, dk), size=chunk, sub=_sub_size(chunk),
      per_channel=per_channel, dtype=dtype, r=r, row_base=0)


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


@functools.partial(jax.jit, static_argnames=("scale", "chunk", "per_channel", "interpret", "group"))
def forward(q, k, v, g, g_aux, s0, *, scale, chunk, per_channel, interpret=False, r=None, group=1):
  """Returns (o `[BH,T,V]`, final state `[BH,K,V]` float32); r: None or the segment counter `[BH,T,1]`.
  q, k `[BH/group,T,K]`: row bh of v reads row bh // group of q and k."""
  t, dk = q.shape[1:]
  bh, dv = v.shape[0], v.shape[-1]
  bv, m = value_tile(dv), chunks_per_step(t, chunk)
  steps = t // (m * chunk)

  def kernel(*refs):
    q_ref, k_ref, v_ref, g_ref, aux_ref, r_ref, s0_ref, o_ref, st_ref, s_scr = chunk_math.optional_ref(refs, r, 5)
    i = pl.program_id(2)

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
  keys, values, _, segments = _row_specs(m, chunk, lambda i: i, group)
  state = pl.BlockSpec((None, dk, bv), lambda b, j, i: (b, 0, j))
  return pl.pallas_call(
      kernel,
      grid=(bh, dv // bv, steps),
      in_specs=chunk_math.with_optional(r, [keys(dk), keys(dk), values(bv), g_spec, aux_spec, state], segments,
                                        at=5),
      out_specs=[values(bv), state],
      out_shape=[jax.ShapeDtypeStruct((bh, t, dv), q.dtype),
                 jax.ShapeDtypeStruct((bh, dk, dv), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((dk, bv), jnp.float32)],
      compiler_params=_params(),
      interpret=interpret,
      name="chunk_recurrence_fwd",
  )(*chunk_math.with_optional(r, [q, k, v, g, g_aux, s0], r, at=5))


@functools.partial(jax.jit, static_argnames=("scale", "chunk", "per_channel", "interpret", "group"))
def backward(q, k, v, g, g_aux, s0, do, ds_final, *, scale, chunk, per_channel, interpret=False, r=None, group=1):
  """Returns (dq, dk `[BH,T,K]` float32 per head (summed over a group by the caller), dv `[BH,T,V]` float32,
  dS0 `[BH,K,V]` float32)."""
  t, dk = q.shape[1:]
  bh, dv = v.shape[0], v.shape[-1]
  bv, m = value_tile(dv), chunks_per_step(t, chunk)
  nvb, steps = dv // bv, t // (m * chunk)
  f32 = jnp.float32
  chunk_at = functools.partial(_chunk, chunk=chunk, dk=dk, per_channel=per_channel, dtype=q.dtype)

  def dq_kernel(*refs):
    k_ref, v_ref, g_ref, aux_ref, r_ref, s0_ref, do_ref, dq_ref, s_scr = chunk_math.optional_ref(refs, r, 4)

    @pl.when(pl.program_id(2) == 0)
    def _():
      s_scr[...] = s0_ref[...]

    def step(j, s):
      return chunk_math.dq_chunk(chunk_at(None, k_ref, v_ref, g_ref, aux_ref, r_ref, j), s, do_ref, dq_ref,
                                 scale=scale)
    s_scr[...] = lax.fori_loop(0, m, step, s_scr[...])

  def dkdv_kernel(*refs):
    q_ref, k_ref, v_ref, g_ref, aux_ref, r_ref, do_ref, dsf_ref, dk_ref, dv_ref, ds0_ref, ds_scr = (
        chunk_math.optional_ref(refs, r, 5))
    i = pl.program_id(2)

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

  state = pl.BlockSpec((None, dk, bv), lambda b, j, i: (b, 0, j))
  scratch = [pltpu.VMEM((dk, bv), f32)]
  partial_shape = jax.ShapeDtypeStruct((nvb, bh, t, dk), f32)

  keys, values, partial, segments = _row_specs(m, chunk, lambda i: i, group)
  g_spec, aux_spec = _decay_specs(per_channel, chunk, m, dk, lambda i: i)
  dq = pl.pallas_call(
      dq_kernel,
      grid=(bh, nvb, steps),
      in_specs=chunk_math.with_optional(r, [keys(dk), values(bv), g_spec, aux_spec, state, values(bv)], segments,
                                        at=4),
      out_specs=partial(dk),
      out_shape=partial_shape,
      scratch_shapes=scratch,
      compiler_params=_params(),
      interpret=interpret,
      name="chunk_recurrence_bwd_dq",
  )(*chunk_math.with_optional(r, [k, v, g, g_aux, s0, do], r, at=4))

  backwards = lambda i: steps - 1 - i
  keys, values, partial, segments = _row_specs(m, chunk, backwards, group)
  g_spec, aux_spec = _decay_specs(per_channel, chunk, m, dk, backwards)
  dk_, dv_, ds0 = pl.pallas_call(
      dkdv_kernel,
      grid=(bh, nvb, steps),
      in_specs=chunk_math.with_optional(
          r, [keys(dk), keys(dk), values(bv), g_spec, aux_spec, values(bv), state], segments, at=5),
      out_specs=[partial(dk), values(bv), state],
      out_shape=[partial_shape, jax.ShapeDtypeStruct((bh, t, dv), f32), jax.ShapeDtypeStruct((bh, dk, dv), f32)],
      scratch_shapes=scratch,
      compiler_params=_params(),
      interpret=interpret,
      name="chunk_recurrence_bwd_dkdv",
  )(*chunk_math.with_optional(r, [q, k, v, g, g_aux, do, ds_final], r, at=5))
  return dq.sum(0), dk_.sum(0), dv_, ds0
