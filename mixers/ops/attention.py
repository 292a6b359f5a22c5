"""Softmax attention, the quadratic baseline: o = softmax(scale q k^T + mask) v."""
import jax
import jax.numpy as jnp

from mixers.ops import checks


def causal_mask(t_q, t_k):
  """`[Tq, Tk]` bool, bottom-right aligned: query i sees keys j <= i + Tk - Tq (the decode convention)."""
  return jnp.arange(t_k)[None, :] <= jnp.arange(t_q)[:, None] + (t_k - t_q)


def attention(q, k, v, *, causal=False, scale=None, mask=None):
  """q `[B,Tq,H,D]`, k `[B,Tk,Hkv,D]`, v `[B,Tk,Hkv,Dv]` (Hkv divides H: grouped queries) -> o `[B,Tq,H,Dv]`.

  `mask` `[B,Tk]` bool marks valid keys (or any shape broadcastable to `[B,H,Tq,Tk]`). Causal masks are
  bottom-right aligned when Tq != Tk, so a block of new queries attends to a longer cache.
  """
  checks.check_float(q=q, k=k, v=v)
  checks.check_rank("q", q, 4, "[B,Tq,H,D]")
  checks.check_rank("k", k, 4, "[B,Tk,Hkv,D]")
  checks.check_shape("k", k, (q.shape[0], None, None, q.shape[-1]), f"[B,Tk,Hkv,D] with B={q.shape[0]}, D={q.shape[-1]}")
  checks.check_shape("v", v, k.shape[:3] + (None,), f"[B,Tk,Hkv,Dv] = {tuple(k.shape[:3])} + (Dv,)")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"k's head count {k.shape[2]} must divide q's {q.shape[2]}")
  t_q, t_k = q.shape[1], k.shape[1]
  full = None
  if mask is not None:
    full = mask[:, None, None, :] if mask.ndim == 2 else mask
    full = jnp.broadcast_to(full, (q.shape[0], q.shape[2], t_q, t_k))
  if causal and t_q != t_k:
    cm = causal_mask(t_q, t_k)[None, None]
    full = cm if full is None else full & cm
  is_causal = causal and t_q == t_k
  if v.shape[-1] == q.shape[-1]:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=full, is_causal=is_causal)
  return _attention_xla(q, k, v, scale, full, is_causal)


def _attention_xla(q, k, v, scale, mask, is_causal):
  """The same math for value widths that differ from the key width."""
  groups = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(a, groups, axis=2) for a in (k, v))
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if is_causal:
    mask = causal_mask(q.shape[1], k.shape[1])[None, None] if mask is None else mask & causal_mask(q.shape[1], k.shape[1])
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
