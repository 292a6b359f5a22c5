"""The delta rule (DeltaNet) and its gated form (Gated DeltaNet): a recurrence whose transition is a matrix.

  S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale q_t^T S_t

q, k `[B,T,H,K]`, v `[B,T,H,V]`, beta `[B,T,H]`, g (log-decay, <= 0) None (DeltaNet) or `[B,T,H]`; states
`[B,H,K,V]` in float32. Equivalently S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T: each
token overwrites what the state returns for k_t with v_t, at rate beta_t. The layers L2-normalise q and k (and
keep beta in (0, 1), or (0, 2) for negative eigenvalues); the op takes them as given.

Forms (`impl`): "reference" (a token loop multiplying by the K x K transition matrix; there is no materialised
T x T form, the transition is not diagonal), "recurrent" (the rank-one update, `lax.scan`), "chunked" (the WY
form in `mixers/ops/delta_chunked.py`), "pallas" (the WY form with its output and state passes in the Pallas chunk
kernel, forward and backward); "auto" is "pallas" where the program is lowered for a GPU or TPU whose kernel takes
the shapes and dtype (chosen at lowering, `recurrence.select_at_lowering`), else "chunked". A sequence split across
devices always runs the chunked form: its chunk transitions are what the slices combine.
"""
import jax
import jax.numpy as jnp

from mixers.ops import checks, delta_chunked, recurrence, sequence
from mixers.ops.recurrence import shapes

IMPLS = ("auto", "chunked", "recurrent", "reference", "pallas")


def _check(q, k, v, beta, log_decay, initial_state):
  shapes.check_qkv(q, k, v)
  checks.check_float(beta=beta, log_decay=log_decay)
  b, t, h, _ = q.shape
  checks.check_shape("beta", beta, (b, t, h), f"[B,T,H] = {(b, t, h)}")
  if log_decay is not None:
    checks.check_shape("log_decay", log_decay, (b, t, h), f"[B,T,H] = {(b, t, h)}")
  shapes.check_state("initial_state", initial_state, q, v)
  return checks.nonpositive_or_nan("log_decay", log_decay)


def _step(q, k, v, beta, s, g, scale):
  """One token in the compute dtype: q, k `[B,H,K]`, v `[B,H,V]`, beta and g `[B,H]`, s `[B,H,K,V]`."""
  if g is not None:
    s = jnp.exp(g)[..., None, None] * s
  update = beta[..., None] * (v - jnp.einsum("bhk,bhkv->bhv", k, s))
  s = s + k[..., :, None] * update[..., None, :]
  return scale * jnp.einsum("bhk,bhkv->bhv", q, s), s


def _scan_tokens(step, q, k, v, beta, log_decay, initial_state, resets=None):
  """Runs `step(q_t, k_t, v_t, beta_t, s, g_t) -> (o_t, s)` over time, s zeroed at a reset: (o `[B,T,H,V]`,
  final state)."""
  b, t, h, dk = q.shape
  dtype = shapes.compute_dtype(q, k, v, beta)
  s0 = jnp.zeros((b, h, dk, v.shape[-1]), dtype) if initial_state is None else initial_state.astype(dtype)
  g = jnp.zeros(beta.shape, dtype) if log_decay is None else log_decay
  xs = tuple(jnp.moveaxis(a.astype(dtype), 1, 0) for a in (q, k, v, beta, g))
  xs += (jnp.moveaxis(jnp.zeros((b, t), bool) if resets is None else resets, 1, 0),)

  def body(s, x):
    s = jnp.where(x[5][:, None, None, None], jnp.zeros_like(s), s)
    o, s = step(*x[:4], s, x[4])
    return s, o

  final, o = jax.lax.scan(body, s0, xs)
  return jnp.moveaxis(o, 0, 1), final


def _recurrent(q, k, v, beta, log_decay, scale, initial_state, resets=None):
  return _scan_tokens(lambda q, k, v, beta, s, g: _step(q, k, v, beta, s, g, scale), q, k, v, beta, log_decay,
                      initial_state, resets)


def _reference(q, k, v, beta, log_decay, scale, initial_state, resets=None):
  """The definition, token by token: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T."""
  def step(q, k, v, beta, s, g):
    eye = jnp.eye(k.shape[-1], dtype=k.dtype)
    transition = jnp.exp(g)[..., None, None] * (eye - beta[..., None, None] * k[..., :, None] * k[..., None, :])
    s = jnp.einsum("bhij,bhjv->bhiv", transition, s) + beta[..., None, None] * k[..., :, None] * v[..., None, :]
    return scale * jnp.einsum("bhk,bhkv->bhv", q, s), s

  return _scan_tokens(step, q, k, v, beta, log_decay, initial_state, resets)


def _kernel_like(q, v, log_decay):
  """The kernel path's inputs' shapes: q, k and U `[B,T,H,*]`, a per-token float32 decay."""
  g = None if log_decay is None else jax.ShapeDtypeStruct(log_decay.shape, jnp.float32)
  return q, q, v, g


def _empty(q, v, beta, initial_state):
  """Nothing to read (B = 0 or T = 0): zero outputs, the initial (or zero) state."""
  b, _, h, dk = q.shape
  dtype = shapes.compute_dtype(q, v, beta)
  state = jnp.zeros((b, h, dk, v.shape[-1]), dtype) if initial_state is None else initial_state.astype(dtype)
  return jnp.zeros(q.shape[:3] + v.shape[-1:], dtype), state


@sequence.splits_time("q", "k", "v", "beta", "log_decay", "segment_ids", batched=("initial_state",))
def delta_rule(q, k, v, beta, *, log_decay=None, scale=None, initial_state=None, return_state=False,
               chunk_size=64, impl="auto", segment_ids=None):
  """(Gated) DeltaNet. q, k `[B,T,H,K]`, v `[B,T,H,V]`, beta `[B,T,H]`, log_decay None | `[B,T,H]` (<= 0).

  Returns o `[B,T,H,V]` in the inputs' dtype, and with `return_state` the final state `[B,H,K,V]` (float32 or
  wider). `scale` defaults to K**-0.5; any T; chunk_size in tokens (chunked form). `segment_ids` `[B,T]` ints
  (packed sequences): the state restarts from zeros where a segment (a run of equal ids) starts, so each segment
  is computed as its own sequence (initial_state reaches the first; the final state is the last one's), in every
  impl.
  """
  checks.check_choice("impl", impl, IMPLS)
  checks.check_positive_int("chunk_size", chunk_size)
  log_decay = _check(q, k, v, beta, log_decay, initial_state)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  segment_ids = checks.check_segment_ids(segment_ids, q.shape[0], q.shape[1])
  resets = sequence.segment_starts(segment_ids)
  if q.shape[0] == 0 or q.shape[1] == 0:
    o, final = _empty(q, v, beta, initial_state)
  elif impl == "reference" and sequence.current_split() is None:
    o, final = _reference(q, k, v, beta, log_decay, scale, initial_state, resets)
  elif impl == "recurrent" and sequence.current_split() is None:
    o, final = _recurrent(q, k, v, beta, log_decay, scale, initial_state, resets)
  else:
    kw = dict(scale=scale, initial_state=initial_state, resets=resets)
    dtypes = shapes.output_dtype(q, k, v), shapes.compute_dtype(q, k, v, beta)
    cast = lambda form: lambda *a, chunk_size=chunk_size: tuple(
        x.astype(d) for x, d in zip(form(*a, chunk_size=chunk_size, **kw), dtypes))
    kernel, chunked = cast(delta_chunked.delta_rule_kernel), cast(delta_chunked.delta_rule)
    args = (q, k, v, beta, log_decay)
    if sequence.current_split() is not None or impl == "chunked":
      o, final = chunked(*args)
    elif impl == "pallas":
      o, final = kernel(*args)
    else:  # auto: the kernel where the program is lowered for a platform that has one for these shapes
      # the chunk also sets the WY blocks: the caller's on every platform
      o, final = recurrence.select_at_lowering(args, chunked, kernel, _kernel_like(q, v, log_decay), chunk_size,
                                               retile=False)
  o = o.astype(shapes.output_dtype(q, k, v))
  return (o, final) if return_state else o


def delta_rule_step(q, k, v, beta, state, *, log_decay=None, scale=None):
  """One token (the decode step): q, k `[B,H,K]`, v `[B,H,V]`, beta `[B,H]`, log_decay None | `[B,H]`,
  state `[B,H,K,V]`; returns (o `[B,H,V]` in the inputs' dtype, new state in float32 or wider)."""
  checks.check_float(q=q, k=k, v=v, beta=beta, state=state, log_decay=log_decay)
  checks.check_rank("q", q, 3, "[B,H,K]")
  b, h, dk = q.shape
  checks.check_shape("k", k, q.shape, f"{tuple(q.shape)} like q [B,H,K]")
  checks.check_shape("v", v, (b, h, None), f"[B,H,V] = {(b, h)} + (V,)")
  checks.check_shape("beta", beta, (b, h), f"[B,H] = {(b, h)}")
  checks.check_shape("state", state, (b, h, dk, v.shape[-1]), f"[B,H,K,V] = {(b, h, dk, v.shape[-1])}")
  if log_decay is not None:
    checks.check_shape("log_decay", log_decay, (b, h), f"[B,H] = {(b, h)}")
    log_decay = checks.nonpositive_or_nan("log_decay", log_decay)
  scale = dk ** -0.5 if scale is None else scale
  dtype = jnp.promote_types(jnp.result_type(state), jnp.float32)
  cast = lambda a: None if a is None else a.astype(dtype)
  o, new_state = _step(cast(q), cast(k), cast(v), cast(beta), cast(state), cast(log_decay), scale)
  return o.astype(shapes.output_dtype(q, k, v)), new_state
