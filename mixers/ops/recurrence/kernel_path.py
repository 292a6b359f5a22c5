"""The gated linear recurrence on the Pallas chunk kernels, for any T, `exclusive` and mixed input dtypes.

The kernels take T a multiple of the chunk, one dtype for q, k, v and the inclusive read o_t = q_t^T S_t. Here:
- q and k may have fewer heads than v (G groups of H // G heads, SSD's C and B): the kernels index them by group;
- T is zero-padded to the chunk (padded tokens write nothing and keep the state: k = v = 0, g = 0);
- q, k, v go in at q and k's promoted dtype (a bfloat16 model whose values were promoted to float32, as Mamba2's
  dt * x, runs the bfloat16 kernel; the kernels accumulate in float32) and o comes back in the inputs' dtype;
- exclusive reads, o_t = q_t^T diag(exp(g_t)) S_{t-1}, run the inclusive kernel on inputs shifted by one token:
  S'_t = S_{t-1} from k'_t = k_{t-1}, v'_t = v_{t-1}, g'_t = g_{t-1} (S'_0 = S_0), read by q'_t = q_t exp(g_t);
  a segment start t clears S'_t (it resets, and its write k'_t is dropped), and the final state is S'_{T-1}
  advanced by token T-1 outside the kernel.
"""
import jax.numpy as jnp

from mixers.ops.recurrence import shapes


def kernel_dtype(q, k):
  """The one dtype the kernels run in: q's and k's, promoted."""
  return jnp.result_type(q, k)


def padded_length(t, chunk_size):
  return t + (-t % chunk_size)


def _shift(x):
  """x `[B,T,...]` one token later along time on one device: x'_0 = 0, x'_t = x_{t-1} (`sequence.shift` would read
  the previous slice's last row under a split, where each slice's recurrence starts from zeros)."""
  return jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


def _decay_factor(log_decay, like):
  """exp(g) broadcast to `like` `[B,T,H,K]` (g `[B,T,H]` or `[B,T,H,K]`)."""
  g = log_decay if log_decay.ndim == like.ndim else log_decay[..., None]
  return jnp.exp(g.astype(jnp.float32))


def _exclusive_inputs(q, k, v, log_decay, resets):
  q_read = q if log_decay is None else (q * _decay_factor(log_decay, q)).astype(q.dtype)
  k_write = _shift(k)
  if resets is not None:
    k_write = jnp.where(resets[..., None, None], 0, k_write)
  return q_read, k_write, _shift(v), None if log_decay is None else _shift(log_decay), resets


def _last_write(state, k, v, log_decay, resets):
  """S_{T-1} from S_{T-2}: one decay and rank-1 write of the last token (its reset drops S_{T-2})."""
  keep = 1.0 if log_decay is None else _decay_factor(log_decay[:, -1:], k[:, -1:])[:, 0, :, :, None]
  if resets is not None:
    keep = keep * (~resets[:, -1]).astype(jnp.float32)[:, None, None, None]
  write = jnp.einsum("bhk,bhv->bhkv", k[:, -1].astype(jnp.float32), v[:, -1].astype(jnp.float32))
  return keep * state + write


def recurrence(q, k, v, log_decay=None, *, scale, initial_state=None, exclusive=False, chunk_size=64, resets=None,
               backend=None, interpret=False):
  """(o `[B,T,H,V]` in the inputs' dtype, final state `[B,H,K,V]` float32) through `kernels.chunked_recurrence`;
  q, k `[B,T,G,K]` with G dividing H.

  backend: None (the kernel picked per platform at lowering), "tpu" or "gpu"; interpret: the Pallas interpreter.
  """
  from mixers import kernels  # pylint: disable=import-outside-toplevel
  out_dtype = shapes.output_dtype(q, k, v)
  dtype = kernel_dtype(q, k)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  t = q.shape[1]
  if exclusive:
    # q's read is scaled per head: the groups go in broadcast to heads
    q, k = (shapes.heads_from_groups(x, v.shape[2]) for x in (q, k))
    shifted = _exclusive_inputs(q, k, v, log_decay, resets)
  else:
    shifted = (q, k, v, log_decay, resets)
  pad = padded_length(t, chunk_size) - t
  if pad:
    pad_time = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    shifted = tuple(pad_time(x) for x in shifted)
  o, state = kernels.chunked_recurrence(*shifted[:4], scale=scale, initial_state=initial_state,
                                        chunk_size=chunk_size, resets=shifted[4], backend=backend,
                                        interpret=interpret)
  if exclusive:
    state = _last_write(state, k, v, log_decay, resets)
  return o[:, :t].astype(out_dtype), state
