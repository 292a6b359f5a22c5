"""HyperAttention (Han et al. 2023, arXiv 2310.05869): softmax attention o = softmax(scale q k^T) v in near-linear time.

Each query's row of attention is estimated from two parts, combined through their log-sum-exps:

- bucket-aligned blocks (sortLSH): queries and keys are hashed by the signs of `lsh_num_projs` random projections,
  the cells numbered in Gray-code order (consecutive numbers are one hyperplane apart); the keys are sorted by
  bucket and cut into blocks of `block_size`, and each query attends exactly to the block that holds its bucket
  (the middle of its bucket's run of sorted keys, or where that run would sit when it is empty). These are the
  heavy entries.
- sampled columns: `sample_size` keys drawn uniformly without replacement per batch and head; for each query the
  samples outside its block estimate the rest of the row: their exponentials are scaled by
  (valid keys outside the block) / (sampled valid keys outside the block).

A block takes at most `ceil(capacity_factor * Tq / num_blocks)` queries, the earliest first; a query past its
block's capacity keeps the sampled estimate of its whole row. The query's block depends only on the query and the
keys, and its place in the block only on earlier queries, so the causal form below is exactly causal.

Causal attention recurses over halves: each half attends to itself causally (recursively), the second half's
queries attend to the first half's keys through the approximation above, and the two are combined through their
log-sum-exps. Any part with at most `min_seq_len` keys is computed exactly, so with T <= min_seq_len, or with
block_size >= every part's key count, or with sample_size >= it, the result is softmax attention to float rounding.

Packed sequences (`segment_ids`): a query and a key of different segments are never paired, in the exact parts, in
the blocks and among the samples, and the samples' scale counts the query's own segment's keys only. So no output
mixes another segment's values, and its gradient with respect to another segment's queries, keys and values is zero;
in the exact regimes above each segment gets softmax attention as if it were its own sequence. In the approximate
regime, which of its own keys share a query's block or are sampled still depends on the whole row (hashes, block
capacities, the sample draw), so a segment's estimate differs from the one it would get alone.
"""
import math

import jax
import jax.numpy as jnp

from mixers.ops import checks
from mixers.ops.recurrence.reference import segment_index
from mixers.ops.sequence import segment_starts


def lsh_buckets(x, projections):
  """x `[..., D]`, projections `[D, P]` -> int32 `[...]` in [0, 2**P): the sign pattern of x @ projections as its
  position in the reflected Gray-code sequence, so buckets whose numbers differ by one differ by one hyperplane."""
  bits = (jnp.einsum("...d,dp->...p", x, projections.astype(x.dtype)) > 0).astype(jnp.int32)
  # The Gray code of position n has bit i = n_i ^ n_(i+1); inverting it, bit i of n is the parity of bits i..P-1.
  parity = jnp.flip(jnp.cumsum(jnp.flip(bits, -1), axis=-1), -1) % 2
  return jnp.sum(parity << jnp.arange(bits.shape[-1], dtype=jnp.int32), axis=-1)


def _take(x, idx):
  """x `[B,H,n,...]` gathered along axis 2 at idx `[B,H,s]` -> `[B,H,s,...]`."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 3)), axis=2)


def _searchsorted(sorted_values, values, side):
  """Per batch and head: where `values` `[B,H,n]` would go in `sorted_values` `[B,H,m]`."""
  flat = jax.vmap(lambda a, x: jnp.searchsorted(a, x, side=side))
  b, h = values.shape[:2]
  return flat(sorted_values.reshape((b * h,) + sorted_values.shape[2:]),
              values.reshape((b * h,) + values.shape[2:])).reshape(values.shape)


def _inverse_permutation(order):
  """order `[B,H,n]` (a permutation per batch and head) -> its inverse."""
  n = order.shape[-1]
  return jax.vmap(jax.vmap(lambda o: jnp.zeros_like(o).at[o].set(jnp.arange(n, dtype=o.dtype))))(order)


def _softmax_part(q, k, v, visible, scale):
  """Attention of q `[...,n,D]` on k `[...,m,D]`, v `[...,m,Dv]` where `visible` (broadcast to `[...,n,m]`):
  (o `[...,n,Dv]`, lse `[...,n]`); a row that sees no key gives o = 0 and lse = -inf."""
  logits = jnp.where(visible, jnp.einsum("...nd,...md->...nm", q, k) * scale, -jnp.inf)
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  top = jnp.where(jnp.isfinite(top), top, 0)
  p = jnp.exp(logits - top[..., None])
  total = jnp.sum(p, axis=-1)
  safe = jnp.where(total > 0, total, 1)
  o = jnp.einsum("...nm,...mv->...nv", p, v) / safe[..., None]
  return o, jnp.where(total > 0, top + jnp.log(safe), -jnp.inf)


def _same_segment(q_seg, k_seg):
  """`[...,n,m]` bool: query and key in one segment, for q_seg `[...,n]` and k_seg `[...,m]` (True: no segments)."""
  return True if q_seg is None else q_seg[..., :, None] == k_seg[..., None, :]


def _segment_count(valid, q_seg, k_seg):
  """`[B,H,n]`: the valid keys in each query's segment; valid and k_seg `[B,H,m]` (k_seg non-decreasing along m,
  as segment indices are), q_seg `[B,H,n]`; without segments every valid key counts."""
  if q_seg is None:
    return jnp.sum(valid, axis=-1, keepdims=True)
  counts = jnp.pad(jnp.cumsum(valid, axis=-1), [(0, 0), (0, 0), (1, 0)])
  lo, hi = (_searchsorted(k_seg, q_seg, side) for side in ("left", "right"))
  return jnp.take_along_axis(counts, hi, axis=-1) - jnp.take_along_axis(counts, lo, axis=-1)


def _combine(o1, lse1, o2, lse2):
  """Attention over the union of two disjoint key sets from each one's (o, lse)."""
  top = jax.lax.stop_gradient(jnp.maximum(lse1, lse2))
  top = jnp.where(jnp.isfinite(top), top, 0)
  w1, w2 = jnp.exp(lse1 - top), jnp.exp(lse2 - top)
  total = w1 + w2
  safe = jnp.where(total > 0, total, 1)
  o = (w1[..., None] * o1 + w2[..., None] * o2) / safe[..., None]
  return o, jnp.where(total > 0, top + jnp.log(safe), -jnp.inf)


def _noncausal(q, k, v, valid, scale, key, cfg, q_seg=None, k_seg=None):
  """q `[B,H,n,D]` on k `[B,H,m,D]`, v `[B,H,m,Dv]` whose keys are `valid` `[B,H,m]` -> (o, lse); q_seg `[B,H,n]`
  and k_seg `[B,H,m]` (non-decreasing) segment indices, or None: a query reads only keys of its segment."""
  n, m = q.shape[2], k.shape[2]
  if m <= cfg["min_seq_len"]:
    return _softmax_part(q, k, v, valid[..., None, :] & _same_segment(q_seg, k_seg), scale)
  block, projections = cfg["block_size"], cfg["projections"]
  num_blocks = -(-m // block)
  capacity = min(n, math.ceil(cfg["capacity_factor"] * n / num_blocks))

  # Keys sorted by bucket (invalid ones last), cut into blocks; padding keys are invalid.
  key_bucket = jnp.where(valid, lsh_buckets(k, projections), 2 ** projections.shape[-1])
  key_order = jnp.argsort(key_bucket, axis=-1, stable=True)
  sorted_buckets = jnp.take_along_axis(key_bucket, key_order, axis=-1)

  def blocks(x):
    x = jnp.pad(x, [(0, 0), (0, 0), (0, num_blocks * block - m)] + [(0, 0)] * (x.ndim - 3))
    return x.reshape(x.shape[:2] + (num_blocks, block) + x.shape[3:])

  k_blocks, v_blocks = blocks(_take(k, key_order)), blocks(_take(v, key_order))
  valid_blocks = blocks(jnp.take_along_axis(valid, key_order, axis=-1))  # [B,H,num_blocks,block]

  # Each query's block: the one holding the middle of its bucket's run of sorted keys.
  query_bucket = lsh_buckets(q, projections)
  run_start, run_end = (_searchsorted(sorted_buckets, query_bucket, side) for side in ("left", "right"))
  middle = (run_start + run_end) // 2
  query_block = jnp.minimum(middle // block, num_blocks - 1)

  # Slots: block b holds its first `capacity` queries in time order.
  query_order = jnp.argsort(query_block, axis=-1, stable=True)
  starts = _searchsorted(jnp.take_along_axis(query_block, query_order, axis=-1),
                         jnp.broadcast_to(jnp.arange(num_blocks, dtype=query_block.dtype), q.shape[:2] + (num_blocks,)),
                         "left")
  rank = _inverse_permutation(query_order) - jnp.take_along_axis(starts, query_block, axis=-1)
  kept = rank < capacity
  first = jnp.minimum(starts[..., None] + jnp.arange(capacity), n - 1).reshape(q.shape[:2] + (-1,))
  source = jnp.take_along_axis(query_order, first, axis=-1)
  q_slots = _take(q, source).reshape(q.shape[:2] + (num_blocks, capacity, q.shape[-1]))
  visible = valid_blocks[..., None, :]  # [B,H,num_blocks,capacity or 1,block]
  if q_seg is not None:
    slot_seg = _take(q_seg, source).reshape(q.shape[:2] + (num_blocks, capacity))
    visible = visible & _same_segment(slot_seg, blocks(jnp.take_along_axis(k_seg, key_order, axis=-1)))
  o_slots, lse_slots = _softmax_part(q_slots, k_blocks, v_blocks, visible, scale)
  slot = query_block * capacity + jnp.minimum(rank, capacity - 1)
  o_block = _take(o_slots.reshape(q.shape[:2] + (-1, v.shape[-1])), slot)
  lse_block = jnp.where(kept, jnp.take_along_axis(lse_slots.reshape(q.shape[:2] + (-1,)), slot, axis=-1), -jnp.inf)
  if cfg["sample_size"] == 0 or num_blocks == 1:  # one block holds every key and (capacity = n) every query
    return o_block, lse_block

  # Sampled columns, without replacement, valid keys first.
  noise = jnp.where(valid, jax.random.uniform(key, valid.shape), 2.0)
  _, picked = jax.lax.top_k(-noise, min(cfg["sample_size"], m))
  picked_block = jnp.take_along_axis(_inverse_permutation(key_order), picked, axis=-1) // block
  in_own_block = kept[..., :, None] & (picked_block[..., None, :] == query_block[..., :, None])
  use = jnp.take_along_axis(valid, picked, axis=-1)[..., None, :] & ~in_own_block  # [B,H,n,s]
  if q_seg is not None:
    use = use & _same_segment(q_seg, jnp.take_along_axis(k_seg, picked, axis=-1))
  o_sample, lse_sample = _softmax_part(q, _take(k, picked), _take(v, picked), use, scale)
  slot_count = jnp.sum(jnp.broadcast_to(visible, lse_slots.shape + (block,)), axis=-1)  # keys each slot reads
  block_count = jnp.take_along_axis(slot_count.reshape(q.shape[:2] + (-1,)), slot, axis=-1)
  outside = _segment_count(valid, q_seg, k_seg) - jnp.where(kept, block_count, 0)
  sampled_outside = jnp.sum(use, axis=-1)
  lse_sample = lse_sample + jnp.log(outside / jnp.maximum(sampled_outside, 1)).astype(lse_sample.dtype)
  return _combine(o_block, lse_block, o_sample, lse_sample)


def _causal(q, k, v, valid, scale, key, cfg, seg=None):
  """Causal self-attention of q, k `[B,H,n,D]`, v `[B,H,n,Dv]`, valid `[B,H,n]` -> (o, lse), by halves; seg
  `[B,H,n]` (segment indices, non-decreasing) or None: a token reads only its segment's earlier tokens."""
  n = q.shape[2]
  if n <= cfg["min_seq_len"]:
    visible = valid[..., None, :] & jnp.tril(jnp.ones((n, n), bool)) & _same_segment(seg, seg)
    return _softmax_part(q, k, v, visible, scale)
  if n % 2:  # one invalid token at the end: a key only it could see, a query that is cut
    q, k, v = (jnp.pad(a, [(0, 0), (0, 0), (0, 1), (0, 0)]) for a in (q, k, v))
    valid = jnp.pad(valid, [(0, 0), (0, 0), (0, 1)])
    seg = None if seg is None else jnp.pad(seg, [(0, 0), (0, 0), (0, 1)], mode="edge")
  b, h, half = q.shape[0], q.shape[1], q.shape[2] // 2
  key_halves, key_cross = jax.random.split(key)
  fold = lambda a: a.reshape((b, 2 * h, half) + a.shape[3:])  # the two halves become heads
  unfold = lambda a: a.reshape((b, h, 2 * half) + a.shape[3:])
  folded, q_seg, k_seg = (None,) * 3 if seg is None else (fold(seg), seg[:, :, half:], seg[:, :, :half])
  o_diag, lse_diag = (unfold(a) for a in _causal(fold(q), fold(k), fold(v), fold(valid), scale, key_halves, cfg,
                                                 folded))
  o_cross, lse_cross = _noncausal(q[:, :, half:], k[:, :, :half], v[:, :, :half], valid[:, :, :half], scale,
                                  key_cross, cfg, q_seg, k_seg)
  o_low, lse_low = _combine(o_diag[:, :, half:], lse_diag[:, :, half:], o_cross, lse_cross)
  o = jnp.concatenate([o_diag[:, :, :half], o_low], axis=2)[:, :, :n]
  lse = jnp.concatenate([lse_diag[:, :, :half], lse_low], axis=2)[:, :, :n]
  return o, lse


def _check_key(key):
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and key.ndim == 0:
    return key
  if dtype == jnp.uint32 and tuple(key.shape) == (2,):
    return key
  raise ValueError(f"key must be a scalar PRNG key (jax.random.key) or a raw uint32 key of shape (2,), got "
                   f"{key!r:.80}")


def hyper_attention(q, k, v, *, causal=False, scale=None, mask=None, block_size=256, sample_size=256,
                    min_seq_len=4096, lsh_num_projs=7, capacity_factor=2.0, key=None, return_lse=False,
                    segment_ids=None):
  """HyperAttention: q `[B,Tq,H,D]`, k `[B,Tk,Hkv,D]`, v `[B,Tk,Hkv,Dv]` (Hkv divides H) -> o `[B,Tq,H,Dv]`.

  Approximates o = softmax(scale q k^T + mask) v (the module docstring gives the estimator); scale defaults to
  D**-0.5. causal needs Tq == Tk. mask: `[B,Tk]` bool, True at keys that may be attended to (a query that sees
  none gives 0). block_size: keys per LSH block; sample_size: uniformly sampled keys (0: blocks only);
  min_seq_len: parts with at most this many keys are exact; lsh_num_projs: hash bits (2**lsh_num_projs buckets);
  capacity_factor (>= 1): a block takes at most capacity_factor times the average number of queries per block.
  key: PRNG key for the projections and the samples (None: jax.random.key(0)); the result is a deterministic
  function of the inputs and the key. return_lse: also return the log-sum-exp of each row's (estimated) scaled
  logits, `[B,Tq,H]` float32 (or float64).
  segment_ids: `[B,T]` ints (packed sequences, a segment is a run of equal ids; self attention, Tq == Tk) or None:
  no query reads a key of another segment, in any part; exact regimes give each segment its attention alone, the
  approximate one an estimate from its own segment's keys (the module docstring says what still depends on the row).
  """
  checks.check_float(q=q, k=k, v=v)
  checks.check_rank("q", q, 4, "[B,Tq,H,D]")
  checks.check_rank("k", k, 4, "[B,Tk,Hkv,D]")
  checks.check_shape("k", k, (q.shape[0], None, None, q.shape[-1]),
                     f"[B,Tk,Hkv,D] with B={q.shape[0]}, D={q.shape[-1]}")
  checks.check_shape("v", v, k.shape[:3] + (None,), f"[B,Tk,Hkv,Dv] = {tuple(k.shape[:3])} + (Dv,)")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"k's head count {k.shape[2]} must divide q's {q.shape[2]}")
  if causal and q.shape[1] != k.shape[1]:
    raise ValueError(f"causal hyper_attention needs as many keys as queries: q has Tq={q.shape[1]}, k has "
                     f"Tk={k.shape[1]}")
  if mask is not None:
    checks.check_shape("mask", mask, (q.shape[0], k.shape[1]), f"[B,Tk] = {(q.shape[0], k.shape[1])}")
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be a bool array, got dtype {mask.dtype}")
  checks.check_positive_int("block_size", block_size)
  checks.check_positive_int("min_seq_len", min_seq_len)
  if not isinstance(sample_size, int) or isinstance(sample_size, bool) or sample_size < 0:
    raise ValueError(f"sample_size must be a non-negative integer, got {sample_size!r}")
  checks.check_positive_int("lsh_num_projs", lsh_num_projs)
  if lsh_num_projs > 24:
    raise ValueError(f"lsh_num_projs must be at most 24 (2**lsh_num_projs buckets), got {lsh_num_projs}")
  if not isinstance(capacity_factor, (int, float)) or not capacity_factor >= 1:
    raise ValueError(f"capacity_factor must be a number >= 1, got {capacity_factor!r}")
  key = jax.random.key(0) if key is None else _check_key(key)
  if segment_ids is not None and q.shape[1] != k.shape[1]:
    raise ValueError(f"segment_ids (packed sequences) need self attention, as many keys as queries: q has "
                     f"Tq={q.shape[1]}, k has Tk={k.shape[1]}")
  segment_ids = checks.check_segment_ids(segment_ids, q.shape[0], q.shape[1])

  out_dtype = jnp.result_type(q, k, v)
  dtype = jnp.promote_types(out_dtype, jnp.float32)
  groups = q.shape[2] // k.shape[2]
  q, k, v = (jnp.swapaxes(a, 1, 2).astype(dtype) for a in (q, k, v))
  k, v = (jnp.repeat(a, groups, axis=1) for a in (k, v))
  b, h, t_k = k.shape[:3]
  valid = jnp.ones((b, h, t_k), bool) if mask is None else jnp.broadcast_to(mask[:, None, :], (b, h, t_k))
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  key_projections, key_samples = jax.random.split(key)
  cfg = dict(block_size=block_size, sample_size=sample_size, min_seq_len=min_seq_len, capacity_factor=capacity_factor,
             projections=jax.random.normal(key_projections, (q.shape[-1], lsh_num_projs), dtype))
  seg = None if segment_ids is None else jnp.broadcast_to(segment_index(segment_starts(segment_ids))[:, None],
                                                          (b, h, t_k))
  if causal:
    o, lse = _causal(q, k, v, valid, scale, key_samples, cfg, seg)
  else:
    o, lse = _noncausal(q, k, v, valid, scale, key_samples, cfg, seg, seg)
  o = jnp.swapaxes(o, 1, 2).astype(out_dtype)
  return (o, jnp.swapaxes(lse, 1, 2)) if return_lse else o
