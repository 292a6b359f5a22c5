"""Chunked (WY / UT-transform) form of the (gated) delta rule: triangular solves inside chunks, states between.

Inside a chunk of C tokens entered with state S, write S_t = exp(g_t) S_{t-1} + k_t u_t^T. With b the cumulative
log-decay in the chunk (gamma_t = exp(b_t)) the pseudo-values u_t satisfy
  u_t = beta_t (v_t - gamma_t k_t^T S - sum_{s<t} exp(b_t - b_s) (k_t . k_s) u_s),
that is (I + A) U = diag(beta) V - diag(beta gamma) K S with A = strictly-lower(diag(beta) K K^T * exp(b_t - b_s)).
One unit-lower-triangular solve (no inverse) gives U0 = (I + A)^-1 diag(beta) V and W = (I + A)^-1 diag(beta gamma) K,
so U = U0 - W S (the product of the chunk's (I - beta k k^T) factors, gates folded in, is gamma_C I - K~^T W) and
  o_t = scale (gamma_t q_t^T S + sum_{s<=t} exp(b_t - b_s) (q_t . k_s) u_s)
  S'  = gamma_C S + K~^T U,   K~_s = exp(b_C - b_s) k_s,
i.e. S' = A_n S + B_n with A_n = gamma_C I - K~^T W `[K,K]` and B_n = K~^T U0 `[K,V]`. The chunk states run
through `sequence.affine_recurrence` (which also combines them across devices). Every exponent is a sum of
log-decays over an interval (<= 0). Cost O(T C (K + V) + T C^2 + T K (K + V)); inputs of any float dtype are
computed in float32 (float64 stays float64). With `resets` (packed segments), r counting the segment starts in the
chunk up to t: A and the scores keep pairs with r_t == r_s, only tokens with r_t == 0 see S (W's rows and the
inter-chunk output), K~ keeps the last segment's tokens and gamma_C I is dropped from a chunk with a start.

The solve is `jax.scipy.linalg.solve_triangular` on accelerators. On CPU that call goes to the BLAS bundled with
SciPy, whose thread pool stalls for seconds (or indefinitely) when the cores are oversubscribed, so CPU runs
forward substitution in plain XLA ops instead (`unit_lower_solve`, with its own JVP).
"""
import jax
import jax.numpy as jnp
from einops import rearrange

from mixers.ops import sequence
from mixers.ops.recurrence import shapes
from mixers.ops.recurrence.reference import chunk_segment_index


def _chunks(x, chunk, dtype):
  """[B, T, H, ...] -> [B, N, H, C, ...] in `dtype`, zero-padded at the end to N*C tokens."""
  pad = -x.shape[1] % chunk
  x = jnp.pad(x.astype(dtype), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  return rearrange(x, "b (n c) h ... -> b n h c ...", c=chunk)


def _decay_mask(b, strict):
  """exp(b_t - b_s) for s < t (strict) or s <= t, else 0: `[..., C, C]` from b `[..., C]`."""
  t = jnp.arange(b.shape[-1])
  keep = (t[None, :] < t[:, None]) if strict else (t[None, :] <= t[:, None])
  return jnp.exp(jnp.where(keep, b[..., :, None] - b[..., None, :], -jnp.inf))


def _substitute(a, rhs):
  """x with (I + a) x = rhs, a strictly lower `[..., C, C]`, rhs `[..., C, W]`: row by row (C steps)."""
  def row(i, x):
    a_i = jax.lax.dynamic_index_in_dim(a, i, axis=-2, keepdims=False)  # [..., C]; zero at and past i
    r_i = jax.lax.dynamic_index_in_dim(rhs, i, axis=-2, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(x, r_i - jnp.einsum("...c,...cw->...w", a_i, x), i, axis=-2)

  return jax.lax.fori_loop(0, a.shape[-1], row, jnp.zeros_like(rhs))


@jax.custom_jvp
def unit_lower_solve(a, rhs):
  """x = (I + a)^-1 rhs for a strictly lower `[..., C, C]` (its diagonal and upper part are ignored)."""
  return _substitute(jnp.tril(a, -1), rhs)


@unit_lower_solve.defjvp
def _solve_jvp(primals, tangents):
  """dx = (I + a)^-1 (d rhs - da x): another substitution, linear in the tangents, so reverse mode transposes it
  (an upper solve) without storing the loop's intermediate rows."""
  a, rhs = primals
  da, drhs = tangents
  a = jnp.tril(a, -1)
  x = _substitute(a, rhs)
  return x, _substitute(a, drhs - jnp.einsum("...ts,...sw->...tw", jnp.tril(da, -1), x))


def solve(a, rhs):
  """(I + a)^-1 rhs, a strictly lower: substitution on CPU, `solve_triangular` elsewhere (see the module doc)."""
  if jax.default_backend() == "cpu":
    return unit_lower_solve(a, rhs)
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  return jax.scipy.linalg.solve_triangular(eye + a, rhs, lower=True, unit_diagonal=True)


def wy(k, v, beta, b, run=None):
  """Per chunk (k `[...,C,K]`, v `[...,C,V]`, beta and b `[...,C]`, run None or the segment index inside the chunk
  `[...,C]`): (W `[...,C,K]`, U0 `[...,C,V]`)."""
  a = beta[..., :, None] * jnp.einsum("...tk,...sk->...ts", k, k) * _decay_mask(b, strict=True)
  entering = jnp.exp(b)
  if run is not None:
    a = jnp.where(run[..., :, None] == run[..., None, :], a, 0)
    entering = entering * (run == 0)
  rhs = jnp.concatenate([beta[..., None] * v, (beta * entering)[..., None] * k], axis=-1)
  solved = solve(a, rhs)
  return solved[..., v.shape[-1]:], solved[..., :v.shape[-1]]


def _pseudo_values(q, k, v, beta, log_decay, initial_state, chunk, dtype, resets=None):
  """The chunked pieces shared by both output paths: (q, k, U chunked `[B,N,H,C,*]`, b `[B,N,H,C]`, the states
  entering each chunk `[B,N,H,K,V]`, the final state, the segment index inside each chunk `[B,N,1,C]` or None)."""
  qc, kc, vc = (_chunks(a, chunk, dtype) for a in (q, k, v))  # [B,N,H,C,*]
  betac = _chunks(beta, chunk, dtype)  # [B,N,H,C]
  b = jnp.zeros_like(betac) if log_decay is None else jnp.cumsum(_chunks(log_decay, chunk, dtype), axis=-1)
  run = None if resets is None else chunk_segment_index(resets, chunk)[:, :, None]
  w, u0 = wy(kc, vc, betac, b, run)
  tail = jnp.exp(b[..., -1:] - b)
  gamma_end = jnp.exp(b[..., -1])
  if run is not None:
    tail = tail * (run == run[..., -1:])
    gamma_end = gamma_end * (run[..., -1] == 0)
  k_end = kc * tail[..., None]
  eye = jnp.eye(kc.shape[-1], dtype=dtype)
  transitions = gamma_end[..., None, None] * eye - jnp.einsum("...sk,...sj->...kj", k_end, w)
  inputs = jnp.einsum("...sk,...sv->...kv", k_end, u0)
  entering, final = sequence.affine_recurrence(transitions, inputs, initial_state)  # [B,N,H,K,V]
  u = u0 - jnp.einsum("...sk,...kv->...sv", w, entering)
  return qc, kc, u, b, entering, final, run


def delta_rule(q, k, v, beta, log_decay=None, *, scale, initial_state=None, chunk_size=64, resets=None):
  """(o `[B,T,H,V]` in the compute dtype, final state `[B,H,K,V]`); any T (zero-padded tokens with beta = 0
  change nothing); resets None or bool `[B,T]` (segment starts)."""
  t = q.shape[1]
  dtype = shapes.compute_dtype(q, k, v, beta)
  qc, kc, u, b, entering, final, run = _pseudo_values(q, k, v, beta, log_decay, initial_state, min(chunk_size, t),
                                                      dtype, resets)
  scores = jnp.einsum("...tk,...sk->...ts", qc, kc) * _decay_mask(b, strict=False)
  inflow = jnp.exp(b)
  if run is not None:
    scores = jnp.where(run[..., :, None] == run[..., None, :], scores, 0)
    inflow = inflow * (run == 0)
  o = jnp.einsum("...tk,...kv->...tv", qc * inflow[..., None], entering) + jnp.einsum("...ts,...sv->...tv",
                                                                                      scores, u)
  o = rearrange(scale * o, "b n h c v -> b (n c) h v")[:, :t]
  return o, final


def delta_rule_kernel(q, k, v, beta, log_decay=None, *, scale, initial_state=None, chunk_size=64, interpret=False,
                      backend=None, resets=None):
  """The same with the output and state passes in the Pallas chunk kernel (`mixers.kernels`, forward and
  backward): given the pseudo-values U, the delta rule's o and S are the gated linear recurrence's over (q, k, U),
  o_t = scale (gamma_t q_t^T S + sum_{s<=t} exp(b_t - b_s) (q_t . k_s) u_s), S' = gamma_C S + K~^T U. The WY
  solve and the `[K,K]` chunk-transition scan that give U stay in XLA. U is cast to q's dtype (the kernel takes
  one input dtype; it accumulates in float32). resets None or bool `[B,T]` (segment starts): U comes from the packed
WY form and the kernel masks by segment, S' = [no start] gamma_C S + K~^T U with K~ kept to the last segment, as in
`delta_rule`. Returns (o `[B,T,H,V]` in q's dtype, final state float32)."""
  from mixers import kernels  # pylint: disable=import-outside-toplevel
  t = q.shape[1]
  dtype = shapes.compute_dtype(q, k, v, beta)
  chunk = chunk_size
  _, _, u, _, _, _, _ = _pseudo_values(q, k, v, beta, log_decay, initial_state, chunk, dtype, resets)
  u = rearrange(u, "b n h c v -> b (n c) h v").astype(q.dtype)
  pad = u.shape[1] - t
  pad_time = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  o, final = kernels.chunked_recurrence(pad_time(q), pad_time(k.astype(q.dtype)), u, pad_time(log_decay),
                                        scale=scale, initial_state=initial_state, chunk_size=chunk,
                                        interpret=interpret, backend=backend, resets=pad_time(resets))
  return o[:, :t], final
