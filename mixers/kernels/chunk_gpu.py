"""GPU (Pallas on Triton) kernels for the chunked gated linear recurrence, in two phases each way.

Forward:
  1. state pass, grid `(batch*heads, K / Kb, V / Vb)`: each program walks the chunks carrying one float32 block
     `[Kb, Vb]` of the state (the recurrence is independent per key and per value column once the decays are
     known) and stores the state at every chunk's start, `[BH, T/C, K, V]` (float32, or the inputs' dtype when it is
     16-bit: `edge_dtype`), and the final state (float32);
  2. output kernel, grid `(batch*heads, T/C, V / Vb)`: every chunk's outputs from its starting state, all chunks
     in parallel (B=1, H=16, T=8192, C=64, V=128: 4,096 programs where a one-pass kernel has 32).
Backward:
  1. the state pass again (the chunk states are recomputed rather than kept between forward and backward);
  2. reverse pass, the state pass's grid: dS carried from the last chunk to the first, stored at every chunk's end,
     and dS0;
  3. gradient kernel, grid `(batch*heads, T/C, V / Vb)`: the chunk's dq, dk (per value block partials
     `[V/Vb, BH, T, K]` that `backward` adds up) and dv from its state and state gradient.
The math per chunk lives in `chunk_math` (shared with the TPU kernels, which run it in one pass).

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
caller, K <= 256. q, k, v, do and the outputs stay in the models' `[B,T,H,D]` layout (BlockSpecs pick a head's
rows; no transposes around the calls), as does a per-channel decay; scalar decays, the chunk totals and the segment
counter are small `[B*H, ...]` rows. Warps and pipeline stages: 4 and 1 for every phase unless `tuning` sets them
per phase (`experiments.benchmark --suite kernels_gpu_tuning` measures the choices on a GPU; none is chosen per
shape yet).
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


def key_block(dk):
  return min(dk, 64)


def supports_gpu(t, dk, dv, chunk_size, dtype, per_channel):
  """Shape constraints of the GPU kernels (dk, dv before padding)."""
  del dv, per_channel
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                              jnp.dtype(jnp.float16)):
    return False
  if not is_pow2(chunk_size) or not 16 <= chunk_size <= 128 or t % chunk_size:
    return False
  return padded_width(dk) <= 256


def edge_dtype(dtype):
  """The dtype of the chunk-edge states the state passes store for the chunk-parallel kernels: the inputs' dtype when
  it is 16-bit, else float32. The carried state is float32 either way, and the output and gradient kernels only read
  an edge state as a matmul operand cast to the inputs' dtype, so 16-bit edges give the same bits at half the
  memory and bandwidth of float32 ones."""
  return jnp.dtype(dtype) if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(jnp.float32)


PHASES = ("state_pass", "output", "dstate_pass", "gradients")


def check_tuning(tuning):
  """tuning: None (4 warps, 1 stage for every phase) or ((phase, num_warps, num_stages), ...) over `PHASES`, as a
  tuple (a static argument); ValueError otherwise."""
  for item in tuning or ():
    if not (isinstance(item, tuple) and len(item) == 3 and item[0] in PHASES and isinstance(item[1], int)
            and is_pow2(item[1]) and item[1] <= 16 and isinstance(item[2], int) and item[2] >= 1):
      raise ValueError(f"tuning: expected a tuple of (phase, num_warps in 1..16 a power of two, num_stages >= 1) "
                       f"with phase in {PHASES}, got item {item!r}")
  return tuning


def _params(tuning, phase):
  """The Triton compiler parameters of one phase (4 warps and 1 stage unless `tuning` names it)."""
  warps, stages = next(((w, s) for p, w, s in tuning or () if p == phase), (4, 1))
  return pl_triton.CompilerParams(num_warps=warps, num_stages=stages)


def _chunk(q, k, v, g, aux, r, *, base, tot_base, chunk, per_channel, dtype):
  return chunk_math.Chunk(
      q=q, k=k, v=v, g=g, g_row=None if per_channel else aux, g_tot=aux if per_channel else None,
      base=base, tot_base=tot_base, size=chunk, sub=16, per_channel=per_channel, dtype=dtype, r=r,
      row_loop=True)


def _heads(heads, group):
  """bh -> (batch, head, q/k group) of grid row bh over batch x heads (lax.div: b >= 0)."""
  def split(bh):
    h = lax.rem(bh, heads)
    return lax.div(bh, heads), h, lax.div(h, group)
  return split


def _walk_specs(shapes, *, chunk, per_channel, bk, group, edges_dtype):
  """(in_specs, r's spec, out_specs, out_shape) of a pass over every chunk on grid (BH, K/Kb, V/Vb): keys (k
  forward, q reverse) `[B,T,G,K]` by key block, values (v or do) `[B,T,H,V]` by value block, g (`[B,T,H,K]`
  per channel, rows `[BH,T,1]` scalar), its auxiliary rows whole, and the state (S0 or dS_T) `[BH,K,V]` by block;
  out: the state at every chunk edge `[BH, T/C, K, V]` (in `edges_dtype`) and the last one (float32)."""
  (b, t, _, dk), (_, _, heads, dv) = shapes
  n, bv = t // chunk, value_block(dv)
  split = _heads(heads, group)
  keys = pl.BlockSpec((None, t, None, bk), lambda bh, kk, j: (split(bh)[0], 0, split(bh)[2], kk))
  values = pl.BlockSpec((None, t, None, bv), lambda bh, kk, j: (split(bh)[0], 0, split(bh)[1], j))
  if per_channel:
    g = pl.BlockSpec((None, t, None, bk), lambda bh, kk, j: (split(bh)[0], 0, split(bh)[1], kk))
    aux = pl.BlockSpec((None, n * dk, 1), lambda bh, kk, j: (bh, 0, 0))
  else:
    g = pl.BlockSpec((None, t, 1), lambda bh, kk, j: (bh, 0, 0))
    aux = pl.BlockSpec((None, 1, t), lambda bh, kk, j: (bh, 0, 0))
  r = pl.BlockSpec((None, t, 1), lambda bh, kk, j: (bh, 0, 0))
  state = pl.BlockSpec((None, bk, bv), lambda bh, kk, j: (bh, kk, j))
  edges = pl.BlockSpec((None, n, bk, bv), lambda bh, kk, j: (bh, 0, kk, j))
  f32 = jnp.float32
  return ([keys, values, g, aux, state], r, [edges, state],
          [jax.ShapeDtypeStruct((b * heads, n, dk, dv), edges_dtype), jax.ShapeDtypeStruct((b * heads, dk, dv), f32)])


def state_pass(k, v, g, g_aux, s0, *, chunk, per_channel, interpret=False, r=None, group=1, q=None, do=None,
               scale=1.0, edges_dtype=None, tuning=None):
  """(states at every chunk edge `[BH, T/C, K, V]` in `edge_dtype(inputs)`, last state `[BH, K, V]` float32).

  Forward (q and do None): S before chunk i from S0, then the state after the last chunk. Reverse (q and do given,
  k and v unused): dS' after chunk i from dS_T (in s0), walking from the last chunk, then dS0."""
  reverse = q is not None
  keys_in, values_in = (q, do) if reverse else (k, v)
  t, dk = keys_in.shape[1], keys_in.shape[3]
  bh, _, dv = s0.shape
  bk, bv, n = key_block(dk), value_block(dv), t // chunk
  in_specs, r_spec, out_specs, out_shape = _walk_specs((keys_in.shape, values_in.shape), chunk=chunk,
                                                       per_channel=per_channel, bk=bk, group=group,
                                                       edges_dtype=edges_dtype or edge_dtype(keys_in.dtype))

  def kernel(*refs):
    keys_ref, values_ref, g_ref, aux_ref, r_ref, s_ref, edges_ref, last_ref = chunk_math.optional_ref(refs, r, 4)
    kk = pl.program_id(1)

    def step(j, s):
      i = n - 1 - j if reverse else j
      edges_ref[i] = s.astype(edges_ref.dtype)
      c = _chunk(keys_ref if reverse else None, None if reverse else keys_ref, None if reverse else values_ref,
                 g_ref, aux_ref, r_ref, base=i * chunk, tot_base=i * dk + kk * bk, chunk=chunk,
                 per_channel=per_channel, dtype=keys_in.dtype)
      if reverse:
        return chunk_math.previous_dstate(c, s, values_ref, scale=scale)
      return chunk_math.next_state(c, s)
    last_ref[...] = lax.fori_loop(0, n, step, s_ref[...].astype(jnp.float32))

  return pl.pallas_call(
      kernel,
      grid=(bh, dk // bk, dv // bv),
      in_specs=chunk_math.with_optional(r, in_specs, r_spec, at=4),
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(tuning, "dstate_pass" if reverse else "state_pass"),
      interpret=interpret,
      name="chunk_recurrence_dstate_pass" if reverse else "chunk_recurrence_state_pass",
  )(*chunk_math.with_optional(r, [keys_in, values_in, g, g_aux, s0], r, at=4))


def _per_chunk_specs(chunk, dk, dv, heads, per_channel, group):
  """BlockSpecs on grid (BH, T/C, V/Vb) for one chunk: (q/k by group, values by block, g, aux, r, state edge,
  per-value-block partials `[V/Vb, B, T, H, K]`)."""
  bv, split = value_block(dv), _heads(heads, group)
  keys = pl.BlockSpec((None, chunk, None, dk), lambda bh, i, j: (split(bh)[0], i, split(bh)[2], 0))
  values = pl.BlockSpec((None, chunk, None, bv), lambda bh, i, j: (split(bh)[0], i, split(bh)[1], j))
  if per_channel:
    g = pl.BlockSpec((None, chunk, None, dk), lambda bh, i, j: (split(bh)[0], i, split(bh)[1], 0))
    aux = pl.BlockSpec((None, dk, 1), lambda bh, i, j: (bh, i, 0))
  else:
    g = pl.BlockSpec((None, chunk, 1), lambda bh, i, j: (bh, i, 0))
    aux = pl.BlockSpec((None, 1, chunk), lambda bh, i, j: (bh, 0, i))
  r = pl.BlockSpec((None, chunk, 1), lambda bh, i, j: (bh, i, 0))
  edge = pl.BlockSpec((None, None, dk, bv), lambda bh, i, j: (bh, i, 0, j))
  partial = pl.BlockSpec((None, None, chunk, None, dk), lambda bh, i, j: (j, split(bh)[0], i, split(bh)[1], 0))
  return keys, values, g, aux, r, edge, partial


@functools.partial(jax.jit, static_argnames=("scale", "chunk", "per_channel", "interpret", "group", "edges_dtype",
                                              "tuning"))
def forward(q, k, v, g, g_aux, s0, *, scale, chunk, per_channel, interpret=False, r=None, group=1, edges_dtype=None,
            tuning=None):
  """Returns (o `[B,T,H,V]`, final state `[BH,K,V]` float32). q, k `[B,T,H/group,K]`, v `[B,T,H,V]` (head h reads
  q and k's group h // group); g `[B,T,H,K]` (per channel) or rows `[BH,T,1]`; r: None or the segment counter
  `[BH,T,1]`; edges_dtype: the stored chunk-edge states' (None: `edge_dtype(q.dtype)`); tuning: warps and stages per
  phase (`check_tuning`)."""
  b, t, heads, dv = v.shape
  dk = q.shape[-1]
  states, last = state_pass(k, v, g, g_aux, s0, chunk=chunk, per_channel=per_channel, interpret=interpret, r=r,
                            group=group, edges_dtype=edges_dtype, tuning=tuning)
  keys, values, g_spec, aux_spec, r_spec, edge, _ = _per_chunk_specs(chunk, dk, dv, heads, per_channel, group)

  def kernel(*refs):
    q_ref, k_ref, v_ref, g_ref, aux_ref, r_ref, s_ref, o_ref = chunk_math.optional_ref(refs, r, 5)
    c = _chunk(q_ref, k_ref, v_ref, g_ref, aux_ref, r_ref, base=0, tot_base=0, chunk=chunk,
               per_channel=per_channel, dtype=q.dtype)
    chunk_math.chunk_output(c, s_ref[...], o_ref, scale=scale)

  o = pl.pallas_call(
      kernel,
      grid=(b * heads, t // chunk, dv // value_block(dv)),
      in_specs=chunk_math.with_optional(r, [keys, keys, values, g_spec, aux_spec, edge], r_spec, at=5),
      out_specs=values,
      out_shape=jax.ShapeDtypeStruct(v.shape, q.dtype),
      compiler_params=_params(tuning, "output"),
      interpret=interpret,
      name="chunk_recurrence_fwd",
  )(*chunk_math.with_optional(r, [q, k, v, g, g_aux, states], r, at=5))
  return o, last


@functools.partial(jax.jit, static_argnames=("scale", "chunk", "per_channel", "interpret", "group", "edges_dtype",
                                              "tuning"))
def backward(q, k, v, g, g_aux, s0, do, ds_final, *, scale, chunk, per_channel, interpret=False, r=None, group=1,
             edges_dtype=None, tuning=None):
  """Returns (dq, dk `[B,T,H,K]` float32 per head (summed over a group by the caller), dv `[B,T,H,V]` float32,
  dS0 `[BH,K,V]` float32)."""
  b, t, heads, dv = v.shape
  dk = q.shape[-1]
  nvb = dv // value_block(dv)
  f32 = jnp.float32
  walk = dict(chunk=chunk, per_channel=per_channel, interpret=interpret, r=r, group=group, edges_dtype=edges_dtype,
              tuning=tuning)
  states, _ = state_pass(k, v, g, g_aux, s0, **walk)
  dstates, ds0 = state_pass(None, None, g, g_aux, ds_final, q=q, do=do, scale=scale, **walk)
  keys, values, g_spec, aux_spec, r_spec, edge, partial = _per_chunk_specs(chunk, dk, dv, heads, per_channel, group)
  partial_shape = jax.ShapeDtypeStruct((nvb, b, t, heads, dk), f32)

  def kernel(*refs):
    q_ref, k_ref, v_ref, g_ref, aux_ref, r_ref, do_ref, s_ref, ds_ref, dq_ref, dk_ref, dv_ref = (
        chunk_math.optional_ref(refs, r, 5))
    c = _chunk(q_ref, k_ref, v_ref, g_ref, aux_ref, r_ref, base=0, tot_base=0, chunk=chunk,
               per_channel=per_channel, dtype=q.dtype)
    chunk_math.dq_output(c, s_ref[...], do_ref, dq_ref, scale=scale)
    chunk_math.dkdv_output(c, ds_ref[...], do_ref, dk_ref, dv_ref, scale=scale)

  dq, dk_, dv_ = pl.pallas_call(
      kernel,
      grid=(b * heads, t // chunk, nvb),
      in_specs=chunk_math.with_optional(r, [keys, keys, values, g_spec, aux_spec, values, edge, edge], r_spec,
                                        at=5),
      out_specs=[partial, partial, values],
      out_shape=[partial_shape, partial_shape, jax.ShapeDtypeStruct(v.shape, f32)],
      compiler_params=_params(tuning, "gradients"),
      interpret=interpret,
      name="chunk_recurrence_bwd",
  )(*chunk_math.with_optional(r, [q, k, v, g, g_aux, do, states, dstates], r, at=5))
  return dq.sum(0), dk_.sum(0), dv_, ds0
