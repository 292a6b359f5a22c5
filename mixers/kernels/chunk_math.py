"""Per-chunk math shared by the TPU and GPU kernels (Pallas kernel-body code).

For one chunk of C tokens with within-chunk cumulative log decay `G_i = sum_{r<=i} g_r` and chunk total
`Gam = G_{C-1}` (scalar per token, or a K-vector per token):

  o_i  = scale (q_i * e^{G_i})^T S + sum_{j<=i} [scale sum_k q_ik k_jk e^{G_ik - G_jk}] v_j
  S'   = e^{Gam} * S + sum_j (k_j * e^{Gam - G_j}) v_j^T
  dq_i = scale [e^{G_i} * (S do_i) + sum_{j<=i} (do_i . v_j) k_j * e^{G_i - G_j}]
  dk_j = e^{Gam - G_j} * (dS' v_j) + sum_{i>=j} (do_i . v_j) scale q_i * e^{G_i - G_j}
  dv_j = (k_j * e^{Gam - G_j})^T dS' + sum_{i>=j} A_ij do_i
  dS   = e^{Gam} * dS' + sum_i scale (q_i * e^{G_i}) do_i^T

Every exponent is <= 0 before `exp` (masked to -inf above the diagonal), so strong decays underflow to 0
instead of overflowing. Per-channel decays cannot factor `e^{G_i - G_j}` into a q side and a k side over a
whole chunk, so the chunk is cut into sub-chunks of `sub` rows: an off-diagonal pair (rows a, columns b < a)
factors through the first row r of sub-chunk a (`e^{G_i - G_r}` and `e^{G_r - G_j}`, both <= 1); a diagonal
pair is formed elementwise as a `[sub, sub, K]` tensor.

Refs hold rows of one (batch, head): q, k `[rows, K]`; v, do, o `[rows, Vb]`; g `[rows, K]` (per channel)
or `[rows, 1]` (scalar) and, for scalar decays, `g_row` `[1, rows]` (the same values along lanes); for
per-channel decays `g_tot` `[chunks * K, 1]` holds each chunk's Gam as a column. `base` is the chunk's first
row in those refs (0 on TPU, where each grid step sees one chunk; `t * C` on GPU, where a loop walks the
chunks) and `tot_base` the first row of its Gam column. Matmul operands are cast to the input dtype with
float32 accumulation; the state stays float32.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Chunk:
  """The refs of one (batch, head) and where the current chunk starts in them."""
  q: Any
  k: Any
  v: Any
  g: Any
  g_row: Any  # scalar decay only
  g_tot: Any  # per-channel decay only
  base: Any
  tot_base: Any
  size: int
  sub: int
  per_channel: bool
  dtype: Any

  def rows(self, ref, r0, n):
    return ref[pl.ds(self.base + r0, n), :].astype(_F32)


def _mm(a, b, dims, dtype):
  return lax.dot_general(a.astype(dtype), b.astype(dtype), (dims, ((), ())),
                         preferred_element_type=_F32)


def mm(a, b, dtype):      # a @ b
  return _mm(a, b, ((1,), (0,)), dtype)


def mm_nt(a, b, dtype):   # a @ b^T
  return _mm(a, b, ((1,), (1,)), dtype)


def mm_tn(a, b, dtype):   # a^T @ b
  return _mm(a, b, ((0,), (0,)), dtype)


def _causal_mask(n, m=None, extra=()):
  shape = (n, n if m is None else m) + extra
  return lax.broadcasted_iota(jnp.int32, shape, 0) >= lax.broadcasted_iota(jnp.int32, shape, 1)


def _select_row(x, i):
  """Row i of x `[n, d]` as `[1, d]` (a masked sum: no unaligned slice of a value)."""
  rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
  return jnp.sum(jnp.where(rows == i, x, 0.0), axis=0, keepdims=True)


def _diag_decay(g):
  """`D[i, j, :] = e^{g_i - g_j}` for i >= j, else 0; g `[n, K]` -> `[n, n, K]`."""
  n, d = g.shape
  diff = g[:, None, :] - g[None, :, :]
  return jnp.exp(jnp.where(_causal_mask(n, n, (d,)), diff, -jnp.inf))


def _scalar_decays(c: Chunk):
  """(G column `[C,1]`, causal decay matrix `[C,C]`, Gam `[1,1]`) for a scalar decay."""
  g_col = c.rows(c.g, 0, c.size)
  g_row = c.g_row[:, pl.ds(c.base, c.size)].astype(_F32)
  decay = jnp.exp(jnp.where(_causal_mask(c.size), g_col - g_row, -jnp.inf))
  return g_col, decay, _select_row(g_col, c.size - 1)


def _channel_totals(c: Chunk):
  """(G `[C,K]`, Gam as a row `[1,K]`, Gam as a column `[K,1]`) for a per-channel decay."""
  g = c.rows(c.g, 0, c.size)
  gam_col = c.g_tot[pl.ds(c.tot_base, g.shape[1]), :].astype(_F32)
  return g, _select_row(g, c.size - 1), gam_col


def _state_update(c: Chunk, s, scale_rows):
  """`e^{Gam} * S + sum_j (k_j * e^{Gam - G_j}) v_j^T`."""
  k, v = c.rows(c.k, 0, c.size), c.rows(c.v, 0, c.size)
  if c.per_channel:
    g, gam_row, gam_col = _channel_totals(c)
    return jnp.exp(gam_col) * s + mm_tn(k * jnp.exp(gam_row - g), v, c.dtype)
  g_col, _, gam = scale_rows
  return jnp.exp(gam) * s + mm_tn(k * jnp.exp(gam - g_col), v, c.dtype)


def forward_chunk(c: Chunk, s, o_ref, *, scale):
  """Writes the chunk's outputs into o_ref rows and returns the state after the chunk."""
  n, dt = c.sub, c.dtype
  if not c.per_channel:
    scalar = _scalar_decays(c)
    g_col, decay, _ = scalar
    q = c.rows(c.q, 0, c.size) * scale
    a = mm_nt(q, c.rows(c.k, 0, c.size), dt) * decay
    o = mm(a, c.rows(c.v, 0, c.size), dt) + mm(q * jnp.exp(g_col), s, dt)
    o_ref[pl.ds(c.base, c.size), :] = o.astype(o_ref.dtype)
    return _state_update(c, s, scalar)
  for ia in range(c.size // n):
    q = c.rows(c.q, ia * n, n) * scale
    g = c.rows(c.g, ia * n, n)
    o = mm(q * jnp.exp(g), s, dt)
    g_ref = _select_row(g, 0)
    q_ref = q * jnp.exp(g - g_ref)
    for ib in range(ia):
      k_ref = c.rows(c.k, ib * n, n) * jnp.exp(g_ref - c.rows(c.g, ib * n, n))
      o = o + mm(mm_nt(q_ref, k_ref, dt), c.rows(c.v, ib * n, n), dt)
    k = c.rows(c.k, ia * n, n)
    a = jnp.sum(q[:, None, :] * k[None, :, :] * _diag_decay(g), axis=2)
    o = o + mm(a, c.rows(c.v, ia * n, n), dt)
    o_ref[pl.ds(c.base + ia * n, n), :] = o.astype(o_ref.dtype)
  return _state_update(c, s, None)


def dq_chunk(c: Chunk, s, do_ref, dq_ref, *, scale):
  """Writes the chunk's dq (this value block's share) and returns the state after the chunk."""
  n, dt = c.sub, c.dtype
  if not c.per_channel:
    scalar = _scalar_decays(c)
    g_col, decay, _ = scalar
    do = c.rows(do_ref, 0, c.size)
    b = mm_nt(do, c.rows(c.v, 0, c.size), dt) * decay
    dq = mm(b, c.rows(c.k, 0, c.size), dt) + jnp.exp(g_col) * mm_nt(do, s, dt)
    dq_ref[pl.ds(c.base, c.size), :] = (scale * dq).astype(dq_ref.dtype)
    return _state_update(c, s, scalar)
  for ia in range(c.size // n):
    do = c.rows(do_ref, ia * n, n)
    g = c.rows(c.g, ia * n, n)
    dq = jnp.exp(g) * mm_nt(do, s, dt)
    g_ref = _select_row(g, 0)
    acc = jnp.zeros_like(dq)
    for ib in range(ia):
      k_ref = c.rows(c.k, ib * n, n) * jnp.exp(g_ref - c.rows(c.g, ib * n, n))
      acc = acc + mm(mm_nt(do, c.rows(c.v, ib * n, n), dt), k_ref, dt)
    dq = dq + jnp.exp(g - g_ref) * acc
    b = mm_nt(do, c.rows(c.v, ia * n, n), dt)
    k = c.rows(c.k, ia * n, n)
    dq = dq + jnp.sum(b[:, :, None] * k[None, :, :] * _diag_decay(g), axis=1)
    dq_ref[pl.ds(c.base + ia * n, n), :] = (scale * dq).astype(dq_ref.dtype)
  return _state_update(c, s, None)


def dkdv_chunk(c: Chunk, ds, do_ref, dk_ref, dv_ref, *, scale):
  """Writes the chunk's dk (this value block's share) and dv; returns dS before the chunk."""
  n, dt = c.sub, c.dtype
  if not c.per_channel:
    g_col, decay, gam = _scalar_decays(c)
    q = c.rows(c.q, 0, c.size) * scale
    k, v, do = (c.rows(r, 0, c.size) for r in (c.k, c.v, do_ref))
    a = mm_nt(q, k, dt) * decay
    b = mm_nt(do, v, dt) * decay
    to_end = jnp.exp(gam - g_col)
    dv = mm_tn(a, do, dt) + mm(k * to_end, ds, dt)
    dk = mm_tn(b, q, dt) + to_end * mm_nt(v, ds, dt)
    dk_ref[pl.ds(c.base, c.size), :] = dk.astype(dk_ref.dtype)
    dv_ref[pl.ds(c.base, c.size), :] = dv.astype(dv_ref.dtype)
    return jnp.exp(gam) * ds + mm_tn(q * jnp.exp(g_col), do, dt)
  g_all, gam_row, gam_col = _channel_totals(c)
  blocks = c.size // n
  for ib in range(blocks):
    k, v, do, g = (c.rows(r, ib * n, n) for r in (c.k, c.v, do_ref, c.g))
    q = c.rows(c.q, ib * n, n) * scale
    to_end = jnp.exp(gam_row - g)
    dv = mm(k * to_end, ds, dt)
    dk = to_end * mm_nt(v, ds, dt)
    for ia in range(ib + 1, blocks):
      g_a = c.rows(c.g, ia * n, n)
      g_ref = _select_row(g_a, 0)
      q_ref = c.rows(c.q, ia * n, n) * scale * jnp.exp(g_a - g_ref)
      from_ref = jnp.exp(g_ref - g)
      do_a = c.rows(do_ref, ia * n, n)
      dv = dv + mm_tn(mm_nt(q_ref, k * from_ref, dt), do_a, dt)
      dk = dk + from_ref * mm_tn(mm_nt(do_a, v, dt), q_ref, dt)
    decay = _diag_decay(g)
    a = jnp.sum(q[:, None, :] * k[None, :, :] * decay, axis=2)
    dv = dv + mm_tn(a, do, dt)
    b = mm_nt(do, v, dt)
    dk = dk + jnp.sum(b[:, :, None] * q[:, None, :] * decay, axis=0)
    dk_ref[pl.ds(c.base + ib * n, n), :] = dk.astype(dk_ref.dtype)
    dv_ref[pl.ds(c.base + ib * n, n), :] = dv.astype(dv_ref.dtype)
  q_all = c.rows(c.q, 0, c.size) * scale
  return jnp.exp(gam_col) * ds + mm_tn(q_all * jnp.exp(g_all), c.rows(do_ref, 0, c.size), dt)
