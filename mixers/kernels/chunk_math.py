"""Per-chunk math shared by the TPU and GPU kernels (Pallas kernel-body code).

For one chunk of C tokens with within-chunk cumulative log decay `G_i = sum_{r<=i} g_r` and chunk total
`Gam = G_{C-1}` (scalar per token, or a K-vector per token):

  o_i  = scale (q_i * e^{G_i})^T S + sum_{j<=i} [scale sum_k q_ik k_jk e^{G_ik - G_jk}] v_j
  S'   = e^{Gam} * S + sum_j (k_j * e^{Gam - G_j}) v_j^T
  dq_i = scale [e^{G_i} * (S do_i) + sum_{j<=i} (do_i . v_j) k_j * e^{G_i - G_j}]
  dk_j = e^{Gam - G_j} * (dS' v_j) + sum_{i>=j} (do_i . v_j) scale q_i * e^{G_i - G_j}
  dv_j = (k_j * e^{Gam - G_j})^T dS' + sum_{i>=j} A_ij do_i
  dS   = e^{Gam} * dS' + sum_i scale (q_i * e^{G_i}) do_i^T

Packed sequences: with an in-chunk segment counter r (`r_i` = segment starts in the chunk up to row i), a pair
(i, j) counts only when r_i == r_j, the state term `q_i e^{G_i} S` only when r_i == 0, and the new state is
`[r_last == 0] e^{Gam} S + sum_j [r_j == r_last] (k_j e^{Gam - G_j}) v_j^T`; the backward masks the same terms
(dS = [r_last == 0] e^{Gam} dS' + sum_i [r_i == 0] scale (q_i e^{G_i}) do_i^T, dk_j and dv_j take dS' only when
r_j == r_last). The masks go into the exponents (-inf) or onto finite scores (a pair's exponent is <= 0 within
a chunk whatever the segments); without a counter no op is added.

Every exponent is <= 0 before `exp` (masked to -inf above the diagonal), so strong decays underflow to 0
instead of overflowing. Per-channel decays cannot factor `e^{G_i - G_j}` into a q side and a k side over a
whole chunk, so the chunk is cut into sub-chunks of `sub` rows: an off-diagonal pair (rows a, columns b < a)
factors through the first row r of sub-chunk a (`e^{G_i - G_r}` and `e^{G_r - G_j}`, both <= 1); a diagonal
pair is formed elementwise as a `[sub, sub, K]` tensor, or one row at a time (`row_loop`, the GPU kernels).

Each step has an output part (`chunk_output`, `dq_output`, `dkdv_output`: from the state or its gradient at the
chunk's edge) and a state part (`next_state`, `previous_dstate`). Single-pass kernels (TPU) run both per chunk while
they walk the chunks; the GPU's two-phase kernels run the state part alone in a sequential pass that stores the state
at every chunk edge, then the output parts for all chunks in parallel. The state parts read only a block of key
columns (and of value columns), so that pass can be tiled over both.

Refs hold rows of one (batch, head): q, k `[rows, K]`; v, do, o `[rows, Vb]`; g `[rows, K]` (per channel)
or `[rows, 1]` (scalar) and, for scalar decays, `g_row` `[1, rows]` (the same values along lanes); for
per-channel decays `g_tot` `[chunks * K, 1]` holds each chunk's Gam as a column. `base` is the chunk's first
row in those refs (a loop walks the chunks of the refs: all of T on GPU, one grid step's block on TPU) and
`tot_base` the first row of its Gam column; `row_base` (TPU) the chunk's first lane in g_row when g_row holds
only this chunk. `r` (packed sequences only, else None) holds the
in-chunk segment counter as a float32 column `[rows, 1]`; where a mask needs it along lanes, the row is built
in the kernel from the column (`_flip`, an exact masked sum), so no lane slice at a sub-chunk offset is
needed, and every mask is compared at its full shape (no boolean broadcasts). Matmul operands are cast to the
input dtype with float32 accumulation; the state stays float32.
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
  r: Any = None  # packed sequences only: the in-chunk segment counter `[rows, 1]`
  row_base: Any = None  # where the chunk starts along g_row's lanes (None: at `base`)
  row_loop: bool = False  # per-channel diagonal blocks one row at a time (GPU), not as `[sub, sub, K]` tensors

  def rows(self, ref, r0, n):
    return ref[pl.ds(self.base + r0, n), :].astype(_F32)

  def segments(self, r0, n):
    """The counter of rows r0..r0+n as a column `[n, 1]`, or None without packed sequences."""
    return None if self.r is None else self.rows(self.r, r0, n)

  def last_segment(self):
    """`[1, 1]`: the counter of the chunk's last row (0: no segment starts in the chunk), or None."""
    return None if self.r is None else _select_row(self.segments(0, self.size), self.size - 1)


def group_rows(index_map, group):
  """A BlockSpec index map over the rows of v (batch x heads) for an operand with one row per group of `group`
  consecutive heads (SSD's B and C): row bh reads row bh // group."""
  if group == 1:
    return index_map
  # lax.div (b >= 0): floor division would lower through sign(), which Mosaic resolves per TPU generation.
  return lambda b, *rest: index_map(lax.div(b, group), *rest)


def with_optional(optional, items, item, *, at):
  """`items` (operands or their BlockSpecs) with `item` inserted at `at` when `optional` is not None."""
  return list(items) if optional is None else list(items[:at]) + [item] + list(items[at:])


def optional_ref(refs, optional, at):
  """A kernel's refs with None at `at` for an optional operand that was not passed (`optional` is None)."""
  return tuple(refs) if optional is not None else tuple(refs[:at]) + (None,) + tuple(refs[at:])


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


def _flip(vec):
  """A column `[n, 1]` as a row `[1, n]`, or a row as a column (a masked sum: exact, no transpose)."""
  n, axis = (vec.shape[0], 0) if vec.shape[1] == 1 else (vec.shape[1], 1)
  rows = lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return jnp.sum(jnp.where(rows == cols, jnp.broadcast_to(vec, (n, n)), 0.0), axis=axis, keepdims=True)


def _same_segment(r_a, r_b):
  """`[n_a, n_b]` bool: row i of block a and row j of block b are in one segment; None without segments."""
  if r_a is None:
    return None
  shape = (r_a.shape[0], r_b.shape[0])
  return jnp.broadcast_to(r_a, shape) == jnp.broadcast_to(_flip(r_b), shape)


def _equal(r, value, shape):
  """`r == value` broadcast to `shape` before the comparison (full-shaped masks only), or None when r is None."""
  return None if r is None else jnp.broadcast_to(r, shape) == jnp.broadcast_to(value, shape)


def _where(keep, x, other):
  """x where keep, else other; x itself when keep is None (no packed sequences: no op added)."""
  return x if keep is None else jnp.where(keep, x, other)


def _diag_decay(g):
  """`D[i, j, :] = e^{g_i - g_j}` for i >= j, else 0; g `[n, K]` -> `[n, n, K]`."""
  n, d = g.shape
  diff = g[:, None, :] - g[None, :, :]
  return jnp.exp(jnp.where(_causal_mask(n, n, (d,)), diff, -jnp.inf))


def _select_col(x, j):
  """Column j of x `[n, m]` as `[n, 1]` (a masked sum)."""
  cols = lax.broadcasted_iota(jnp.int32, x.shape, 1)
  return jnp.sum(jnp.where(cols == j, x, 0.0), axis=1, keepdims=True)


def _decay_to(g, g_s):
  """`e^{min(g - g_s, 0)}`: the decay from row s to the rows of g at or after it (1 before it; masked by callers)."""
  return jnp.exp(jnp.minimum(g - g_s, 0.0))


def _diag_scores(c: Chunk, x, y_ref, r0, n):
  """`[n, n]`: `sum_k x_ik y_jk e^{G_ik - G_jk}` for i >= j, else 0, over rows r0..r0+n of a per-channel chunk (x:
  those rows of a q-like operand, y_ref: a k-like ref). Row by row with `row_loop` (no `[n, n, K]` tensor)."""
  g = c.rows(c.g, r0, n)
  if not c.row_loop:
    return jnp.sum(x[:, None, :] * c.rows(y_ref, r0, n)[None, :, :] * _diag_decay(g), axis=2)
  cols = lax.broadcasted_iota(jnp.int32, (n, n), 1)
  a = jnp.zeros((n, n), _F32)
  for j in range(n):
    col = jnp.sum(x * c.rows(y_ref, r0 + j, 1) * _decay_to(g, c.rows(c.g, r0 + j, 1)), axis=1, keepdims=True)
    a = a + jnp.where(cols == j, jnp.broadcast_to(col, (n, n)), 0.0)
  return jnp.where(_causal_mask(n), a, 0.0)


def _diag_apply(c: Chunk, coef, y_ref, r0, n, *, later, y_scale=1.0):
  """`[n, K]` over rows r0..r0+n of a per-channel chunk, coef `[n, n]` indexed (later row i, earlier row j):
  later=False: row i is `sum_{j<=i} coef_ij y_j e^{G_i - G_j}`; later=True: row j is
  `sum_{i>=j} coef_ij y_i e^{G_i - G_j}`; y = y_scale * rows of y_ref. Row by row with `row_loop`."""
  g = c.rows(c.g, r0, n)
  if not c.row_loop:
    y = c.rows(y_ref, r0, n) * y_scale
    if later:
      return jnp.sum(coef[:, :, None] * y[:, None, :] * _diag_decay(g), axis=0)
    return jnp.sum(coef[:, :, None] * y[None, :, :] * _diag_decay(g), axis=1)
  index = lax.broadcasted_iota(jnp.int32, (n, 1), 0)
  out = jnp.zeros(g.shape, _F32)
  for s in range(n):
    y_s, g_s = c.rows(y_ref, r0 + s, 1) * y_scale, c.rows(c.g, r0 + s, 1)
    if later:  # row s is the later one: coef's row s, as a column over the earlier rows j <= s
      weight = jnp.where(index <= s, _flip(_select_row(coef, s)), 0.0)
      out = out + weight * y_s * _decay_to(g_s, g)
    else:  # row s is the earlier one: coef's column s, over the later rows i >= s
      weight = jnp.where(index >= s, _select_col(coef, s), 0.0)
      out = out + weight * y_s * _decay_to(g, g_s)
  return out


def _scalar_totals(c: Chunk):
  """(G column `[C,1]`, Gam `[1,1]`) for a scalar decay."""
  g_col = c.rows(c.g, 0, c.size)
  return g_col, _select_row(g_col, c.size - 1)


def _scalar_decays(c: Chunk):
  """(G column `[C,1]`, causal decay matrix `[C,C]` (0 across segments), Gam `[1,1]`) for a scalar decay."""
  g_col, gam = _scalar_totals(c)
  g_row = c.g_row[:, pl.ds(c.base if c.row_base is None else c.row_base, c.size)].astype(_F32)
  r = c.segments(0, c.size)
  keep = _causal_mask(c.size)
  if r is not None:
    keep = keep & _same_segment(r, r)
  decay = jnp.exp(jnp.where(keep, g_col - g_row, -jnp.inf))
  return g_col, decay, gam


def _channel_totals(c: Chunk):
  """(G `[C,K]`, Gam as a row `[1,K]`, Gam as a column `[K,1]`) for a per-channel decay."""
  g = c.rows(c.g, 0, c.size)
  gam_col = c.g_tot[pl.ds(c.tot_base, g.shape[1]), :].astype(_F32)
  return g, _select_row(g, c.size - 1), gam_col


def _inflow(c: Chunk, g, r0, n):
  """`e^{G_i}` for rows r0..r0+n (g their G), 0 for the rows after the chunk's first segment start."""
  return jnp.exp(_where(_equal(c.segments(r0, n), 0.0, g.shape), g, -jnp.inf))


def _to_end(c: Chunk, gam, g, r0, n):
  """`e^{Gam - G_j}` for rows r0..r0+n, 0 for the rows outside the chunk's last segment."""
  to_end = gam - g
  return jnp.exp(_where(_equal(c.segments(r0, n), c.last_segment(), to_end.shape), to_end, -jnp.inf))


def _carry(c: Chunk, gam, s):
  """`e^{Gam} * S`, or 0 when a segment starts in the chunk."""
  return jnp.exp(_where(_equal(c.last_segment(), 0.0, gam.shape), gam, -jnp.inf)) * s


def next_state(c: Chunk, s):
  """The state after the chunk from the state s before it: `e^{Gam} * S + sum_j (k_j * e^{Gam - G_j}) v_j^T`
  (packed: see the module docstring). k and the decays may be a block of key columns, v a block of value columns."""
  k, v = c.rows(c.k, 0, c.size), c.rows(c.v, 0, c.size)
  if c.per_channel:
    g, gam_row, gam_col = _channel_totals(c)
    return _carry(c, gam_col, s) + mm_tn(k * _to_end(c, gam_row, g, 0, c.size), v, c.dtype)
  g_col, gam = _scalar_totals(c)
  return _carry(c, gam, s) + mm_tn(k * _to_end(c, gam, g_col, 0, c.size), v, c.dtype)


def previous_dstate(c: Chunk, ds, do_ref, *, scale):
  """dS before the chunk from dS' after it: `e^{Gam} * dS' + sum_i scale (q_i * e^{G_i}) do_i^T` (packed: see the
  module docstring). q and the decays may be a block of key columns, do a block of value columns."""
  q = c.rows(c.q, 0, c.size) * scale
  if c.per_channel:
    g, _, gam = _channel_totals(c)
  else:
    g, gam = _scalar_totals(c)
  return _carry(c, gam, ds) + mm_tn(q * _inflow(c, g, 0, c.size), c.rows(do_ref, 0, c.size), c.dtype)


def chunk_output(c: Chunk, s, o_ref, *, scale):
  """Writes the chunk's outputs into o_ref rows from the state s before the chunk."""
  n, dt = c.sub, c.dtype
  if not c.per_channel:
    g_col, decay, _ = _scalar_decays(c)
    q = c.rows(c.q, 0, c.size) * scale
    a = mm_nt(q, c.rows(c.k, 0, c.size), dt) * decay
    o = mm(a, c.rows(c.v, 0, c.size), dt) + mm(q * _inflow(c, g_col, 0, c.size), s, dt)
    o_ref[pl.ds(c.base, c.size), :] = o.astype(o_ref.dtype)
    return
  for ia in range(c.size // n):
    q = c.rows(c.q, ia * n, n) * scale
    g = c.rows(c.g, ia * n, n)
    r_a = c.segments(ia * n, n)
    o = mm(q * _inflow(c, g, ia * n, n), s, dt)
    g_ref = _select_row(g, 0)
    q_ref = q * jnp.exp(g - g_ref)
    for ib in range(ia):
      k_ref = c.rows(c.k, ib * n, n) * jnp.exp(g_ref - c.rows(c.g, ib * n, n))
      a = _where(_same_segment(r_a, c.segments(ib * n, n)), mm_nt(q_ref, k_ref, dt), 0.0)
      o = o + mm(a, c.rows(c.v, ib * n, n), dt)
    a = _where(_same_segment(r_a, r_a), _diag_scores(c, q, c.k, ia * n, n), 0.0)
    o = o + mm(a, c.rows(c.v, ia * n, n), dt)
    o_ref[pl.ds(c.base + ia * n, n), :] = o.astype(o_ref.dtype)


def forward_chunk(c: Chunk, s, o_ref, *, scale):
  """Writes the chunk's outputs into o_ref rows and returns the state after the chunk."""
  chunk_output(c, s, o_ref, scale=scale)
  return next_state(c, s)


def dq_output(c: Chunk, s, do_ref, dq_ref, *, scale):
  """Writes the chunk's dq (this value block's share) from the state s before the chunk."""
  n, dt = c.sub, c.dtype
  if not c.per_channel:
    g_col, decay, _ = _scalar_decays(c)
    do = c.rows(do_ref, 0, c.size)
    b = mm_nt(do, c.rows(c.v, 0, c.size), dt) * decay
    dq = mm(b, c.rows(c.k, 0, c.size), dt) + _inflow(c, g_col, 0, c.size) * mm_nt(do, s, dt)
    dq_ref[pl.ds(c.base, c.size), :] = (scale * dq).astype(dq_ref.dtype)
    return
  for ia in range(c.size // n):
    do = c.rows(do_ref, ia * n, n)
    g = c.rows(c.g, ia * n, n)
    r_a = c.segments(ia * n, n)
    dq = _inflow(c, g, ia * n, n) * mm_nt(do, s, dt)
    g_ref = _select_row(g, 0)
    acc = jnp.zeros_like(dq)
    for ib in range(ia):
      k_ref = c.rows(c.k, ib * n, n) * jnp.exp(g_ref - c.rows(c.g, ib * n, n))
      b = _where(_same_segment(r_a, c.segments(ib * n, n)), mm_nt(do, c.rows(c.v, ib * n, n), dt), 0.0)
      acc = acc + mm(b, k_ref, dt)
    dq = dq + jnp.exp(g - g_ref) * acc
    b = _where(_same_segment(r_a, r_a), mm_nt(do, c.rows(c.v, ia * n, n), dt), 0.0)
    dq = dq + _diag_apply(c, b, c.k, ia * n, n, later=False)
    dq_ref[pl.ds(c.base + ia * n, n), :] = (scale * dq).astype(dq_ref.dtype)


def dq_chunk(c: Chunk, s, do_ref, dq_ref, *, scale):
  """Writes the chunk's dq (this value block's share) and returns the state after the chunk."""
  dq_output(c, s, do_ref, dq_ref, scale=scale)
  return next_state(c, s)


def dkdv_output(c: Chunk, ds, do_ref, dk_ref, dv_ref, *, scale):
  """Writes the chunk's dk (this value block's share) and dv from dS', the state gradient after the chunk."""
  n, dt = c.sub, c.dtype
  if not c.per_channel:
    g_col, decay, gam = _scalar_decays(c)
    q = c.rows(c.q, 0, c.size) * scale
    k, v, do = (c.rows(r, 0, c.size) for r in (c.k, c.v, do_ref))
    a = mm_nt(q, k, dt) * decay
    b = mm_nt(do, v, dt) * decay
    to_end = _to_end(c, gam, g_col, 0, c.size)
    dv = mm_tn(a, do, dt) + mm(k * to_end, ds, dt)
    dk = mm_tn(b, q, dt) + to_end * mm_nt(v, ds, dt)
    dk_ref[pl.ds(c.base, c.size), :] = dk.astype(dk_ref.dtype)
    dv_ref[pl.ds(c.base, c.size), :] = dv.astype(dv_ref.dtype)
    return
  _, gam_row, _ = _channel_totals(c)
  blocks = c.size // n
  for ib in range(blocks):
    k, v, do, g = (c.rows(r, ib * n, n) for r in (c.k, c.v, do_ref, c.g))
    q = c.rows(c.q, ib * n, n) * scale
    r_b = c.segments(ib * n, n)
    to_end = _to_end(c, gam_row, g, ib * n, n)
    dv = mm(k * to_end, ds, dt)
    dk = to_end * mm_nt(v, ds, dt)
    for ia in range(ib + 1, blocks):
      g_a = c.rows(c.g, ia * n, n)
      g_ref = _select_row(g_a, 0)
      q_ref = c.rows(c.q, ia * n, n) * scale * jnp.exp(g_a - g_ref)
      from_ref = jnp.exp(g_ref - g)
      do_a = c.rows(do_ref, ia * n, n)
      same = _same_segment(c.segments(ia * n, n), r_b)
      dv = dv + mm_tn(_where(same, mm_nt(q_ref, k * from_ref, dt), 0.0), do_a, dt)
      dk = dk + from_ref * mm_tn(_where(same, mm_nt(do_a, v, dt), 0.0), q_ref, dt)
    same = _same_segment(r_b, r_b)
    a = _where(same, _diag_scores(c, q, c.k, ib * n, n), 0.0)
    dv = dv + mm_tn(a, do, dt)
    b = _where(same, mm_nt(do, v, dt), 0.0)
    dk = dk + _diag_apply(c, b, c.q, ib * n, n, later=True, y_scale=scale)
    dk_ref[pl.ds(c.base + ib * n, n), :] = dk.astype(dk_ref.dtype)
    dv_ref[pl.ds(c.base + ib * n, n), :] = dv.astype(dv_ref.dtype)


def dkdv_chunk(c: Chunk, ds, do_ref, dk_ref, dv_ref, *, scale):
  """Writes the chunk's dk (this value block's share) and dv; returns dS before the chunk."""
  dkdv_output(c, ds, do_ref, dk_ref, dv_ref, scale=scale)
  return previous_dstate(c, ds, do_ref, scale=scale)
