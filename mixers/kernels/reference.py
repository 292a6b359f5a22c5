"""Token-by-token reference of the gated linear recurrence the kernels compute.

`S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`, `o_t = scale * q_t^T S_t`, in float32 (or wider) with `lax.scan`.
Shapes: q, k `[B,T,H,K]`, v `[B,T,H,V]`, g None | `[B,T,H]` | `[B,T,H,K]`, state `[B,H,K,V]`; `resets` None or
`[B,T]` (nonzero where a packed segment starts: S_{t-1} is replaced by zeros there).
"""
import jax
import jax.numpy as jnp


def recurrence_reference(q, k, v, log_decay=None, *, scale=1.0, initial_state=None, resets=None):
  """Returns (o `[B,T,H,V]` in q's dtype, final state `[B,H,K,V]` float32, or float64 for float64 q)."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  acc = jnp.promote_types(jnp.float32, q.dtype)  # float64 inputs stay float64
  f32 = lambda x: x.astype(acc)
  if log_decay is None:
    log_decay = jnp.zeros((b, t, h), acc)
  g = f32(log_decay)
  if g.ndim == 3:
    g = g[..., None]
  g = jnp.broadcast_to(g, (b, t, h, dk))
  s0 = (jnp.zeros((b, h, dk, dv), acc) if initial_state is None
        else f32(initial_state))
  keep = jnp.ones((b, t), acc) if resets is None else (resets == 0).astype(acc)

  def step(s, xs):
    q_t, k_t, v_t, g_t, keep_t = xs  # [B,H,K], [B,H,K], [B,H,V], [B,H,K], [B]
    s = keep_t[:, None, None, None] * jnp.exp(g_t)[..., None] * s + k_t[..., None] * v_t[..., None, :]
    o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t, s, precision="highest")
    return s, o_t

  xs = tuple(jnp.moveaxis(f32(x), 1, 0) for x in (q, k, v, g, keep))
  s, o = jax.lax.scan(step, s0, xs)
  return jnp.moveaxis(o, 0, 1).astype(q.dtype), s
