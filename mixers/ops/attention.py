"""Softmax attention, the quadratic baseline: o = softmax(scale q k^T + mask) v.

The mask is the boolean visibility of key s from query t: all (cross or bidirectional), causal (s <= t,
bottom-right aligned when Tq != Tk), Prefix-LM (causal, and s < P when t < P) or block-causal
(s // b <= t // b), intersected with the caller's `mask` and, for packed sequences, with t and s being in one
segment.
"""
import jax
import jax.numpy as jnp

from mixers.ops import checks, sequence
from mixers.ops.recurrence import reference


def causal_mask(t_q, t_k):
  """`[Tq, Tk]` bool, bottom-right aligned: query i sees keys j <= i + Tk - Tq (the decode convention)."""
  return jnp.arange(t_k)[None, :] <= jnp.arange(t_q)[:, None] + (t_k - t_q)


def visibility(t_q, t_k, *, causal=False, prefix_len=None, block_size=None, batch=1):
  """`[B or 1, 1, Tq, Tk]` bool: query t sees key s (None when every key is visible).

  causal: s <= t + Tk - Tq; prefix_len P (`[B]` per row; needs Tq == Tk): also s < P when t < P; block_size b
  (needs Tq == Tk): s // b <= t // b.
  """
  if prefix_len is not None or block_size is not None:
    if not causal:
      raise ValueError("prefix_len and block_size widen the causal mask: they need causal=True")
    if prefix_len is not None and block_size is not None:
      raise ValueError("prefix_len and block_size are two different masks: pass one of them, not both")
    if t_q != t_k:
      raise ValueError(f"prefix_len and block_size need queries and keys of one sequence (Tq == Tk), got Tq = "
                       f"{t_q}, Tk = {t_k}")
  if not causal:
    return None
  t, s = jnp.arange(t_q)[:, None], jnp.arange(t_k)[None, :]
  if block_size is not None:
    checks.check_positive_int("block_size", block_size)
    return (s // block_size <= t // block_size)[None, None]
  seen = causal_mask(t_q, t_k)[None, None]
  if prefix_len is not None:
    p = jnp.reshape(checks.check_prefix_len(prefix_len, batch, t_q), (-1, 1, 1, 1))
    seen = seen | ((t < p) & (s < p))
  return seen


def same_segment(segment_ids):
  """`[B,1,T,T]` bool: tokens t and s are in one segment of `segment_ids` `[B,T]` (a segment is a run of equal
  ids, so ids may repeat across segments, as a padding id does)."""
  return reference.same_segment(sequence.segment_starts(segment_ids))


def attention(q, k, v, *, causal=False, prefix_len=None, block_size=None, scale=None, mask=None,
              segment_ids=None):
  """q `[B,Tq,H,D]`, k `[B,Tk,Hkv,D]`, v `[B,Tk,Hkv,Dv]` (Hkv divides H: grouped queries) -> o `[B,Tq,H,Dv]`.

  o_t = sum_s softmax_s(scale q_t . k_s over the keys visible from t) v_s; `scale` defaults to D**-0.5.
  Visible: every key (cross attention: any Tk), or with `causal` s <= t, bottom-right aligned when Tq != Tk
  (s <= t + Tk - Tq, so a block of new queries attends to a longer cache). With causal and Tq == Tk,
  `prefix_len` P (int or int array `[B]`, 0 <= P <= T; Prefix-LM) also shows s < P to t < P, and `block_size`
  b (block-causal) shows s when s // b <= t // b; one of them. `mask` `[B,Tk]` bool marks valid keys (or any
  shape broadcastable to `[B,H,Tq,Tk]`) and is intersected with the pattern. `segment_ids` `[B,T]` ints (packed
  sequences, Tq == Tk): t sees s only inside its own segment (a run of equal ids).
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
  if segment_ids is not None:
    if t_q != t_k:
      raise ValueError(f"segment_ids need queries and keys of one sequence (Tq == Tk), got Tq = {t_q}, Tk = {t_k}")
    same = same_segment(checks.check_segment_ids(segment_ids, q.shape[0], t_q))
    full = same if full is None else full & same
  plain_causal = causal and t_q == t_k and prefix_len is None and block_size is None
  seen = None if plain_causal else visibility(t_q, t_k, causal=causal, prefix_len=prefix_len,
                                               block_size=block_size, batch=q.shape[0])
  if seen is not None:
    full = seen if full is None else full & seen
  if v.shape[-1] == q.shape[-1]:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=full, is_causal=plain_causal)
  return _attention_xla(q, k, v, scale, full, plain_causal)


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
