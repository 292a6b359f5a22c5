"""The time axis of `[B,T,...]` arrays, whole on one device or cut into equal slices across a mesh axis.

Ops are written once on these primitives. On one device each is the plain computation. Inside a split
(`split_time`, a `jax.shard_map` manual over the one mesh axis that cuts T; batch and heads keep whatever
sharding they have) device p holds slice p and the primitives exchange states only, never activations:

  recurrence            the gated linear recurrence; slices all-gather their final states and total decays
  affine_recurrence     S_n = A_n S_{n-1} + B_n with matrix transitions; slices all-gather their composed (A, B)
  sum_over_time         a per-slice partial sum completed by a psum
  logsumexp_over_time   the same in log space
  logcumsumexp_over_time  running log-sums; slices all-gather their log-sums (LightNet's normaliser)
  shift                 x_{t-1} or x_{t+1}; one boundary token comes from the neighbouring slice

An op declares which of its arguments are split along time with `@splits_time(...)`. A declared op called
under an active mesh with a `sequence` axis (`jax.set_mesh`) splits itself when that axis divides T;
`mixers.sharding.sequence_parallel(op, mesh)` splits it over a given mesh for any T (padding at the end).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mixers.ops.recurrence import gated_linear_recurrence, shapes

SEQUENCE_AXIS = "sequence"
BATCH_AXES = ("data", "fsdp")  # mesh axes that split the batch (the `batch` logical axis of mixers.sharding)


@dataclasses.dataclass(frozen=True)
class Split:
  """Time cut over mesh axis `axis` into `slices` slices of `slice_length`; tokens at or past `length` are
  padding."""
  axis: str
  length: int
  slice_length: int
  slices: int

  def positions(self):
    """Global positions `[L]` of this device's slice."""
    return jax.lax.axis_index(self.axis) * self.slice_length + jnp.arange(self.slice_length)

  @property
  def padded(self):
    return self.slices * self.slice_length != self.length


_ACTIVE: list[Split] = []


def current_split() -> Split | None:
  """The split being traced (None on one device)."""
  return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def _splitting(split: Split):
  _ACTIVE.append(split)
  try:
    yield
  finally:
    _ACTIVE.pop()


# ----------------------------------------------------------------------------------------------------
# primitives


def _flip(x):
  return None if x is None else jnp.flip(x, axis=1)


def _zero_state(q, v, dtype):
  """Zeros `[B,H,K,V]` varying over the same manual mesh axes as q and v (a valid scan carry)."""
  zeros = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), dtype)
  varying = lambda x: jax.typeof(x).manual_axis_type.varying
  axes = tuple(sorted(varying(q) | varying(v)))
  return jax.lax.pcast(zeros, axes, to="varying") if axes else zeros


def _combine_states(states, log_totals, initial_state, carries=None):
  """Prefix over slices: states `[P,B,H,K,V]`, log_totals None | `[P,B,H,1|K]`, carries None | bool `[P,B]` (the
  slice passes its incoming state on: no segment starts in it) -> (incoming `[P,...]`, final)."""
  start = jnp.zeros_like(states[0]) if initial_state is None else initial_state.astype(states.dtype)

  def step(s_in, x):
    s_p, g_p, c_p = x
    passed = s_in if g_p is None else jnp.exp(g_p)[..., None] * s_in
    if c_p is not None:
      passed = jnp.where(c_p[:, None, None, None], passed, jnp.zeros_like(passed))
    return s_p + passed, s_in

  final, incoming = jax.lax.scan(step, start, (states, log_totals, carries))
  return incoming, final


def segment_starts(segment_ids, reverse=False):
  """bool `[B,T]`: token t starts a segment of `segment_ids` `[B,T]` (a run of equal ids) in the direction of the
  pass: its id differs from the previous token's (`reverse`: the next token's). The sequence's first token never
  does (the initial state belongs to the first segment), nor does padding past the sequence's end. Split along time,
the neighbour may be on another slice."""
  if segment_ids is None:
    return None
  t = segment_ids.shape[1]
  split = current_split()
  pos, length = positions(t), (t if split is None else split.length)
  if reverse:
    return (segment_ids != shift(segment_ids, -1)) & (pos < length - 1)[None]
  return (segment_ids != shift(segment_ids, 1)) & ((pos > 0) & (pos < length))[None]


def recurrence(q, k, v, log_decay=None, *, scale=1.0, initial_state=None, exclusive=False, reverse=False,
               chunk_size=64, impl="auto", segment_ids=None):
  """The gated linear recurrence over the whole time axis: (o `[B,T,H,V]`, final state `[B,H,K,V]`).

  Forward: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T; `reverse` runs from the last token to the first,
  S_t = diag(exp(g_t)) S_{t+1} + k_t v_t^T. o_t = scale q_t^T S_t (`exclusive`: the state before t's write).
  `segment_ids` `[B,T]`: the recurrence restarts from zeros where a segment starts (in the pass's direction).
  Split: each slice runs from zero; the state entering slice p is the prefix of the gathered slice states,
  and adds scale (q_t exp(c_t))^T S_in to each output before the slice's first segment start, c_t the slice's
  cumulative log-decay up to t; a slice with a segment start passes no incoming state on.
  """
  log_decay = shapes.normalize_log_decay(log_decay, q)
  resets = segment_starts(segment_ids, reverse)
  if reverse:
    q, k, v, log_decay, resets = (_flip(a) for a in (q, k, v, log_decay, resets))
  kw = dict(scale=scale, exclusive=exclusive, chunk_size=chunk_size, impl=impl, resets=resets)
  split = current_split()
  if split is None:
    o, final = gated_linear_recurrence(q, k, v, log_decay, initial_state=initial_state, **kw)
    return (_flip(o) if reverse else o), final
  acc = shapes.compute_dtype(q, k, v)
  if log_decay is not None and split.padded:
    position = split.positions()
    real = position < split.length if not reverse else jnp.flip(position) < split.length
    log_decay = jnp.where(real.reshape((1, -1) + (1,) * (log_decay.ndim - 2)), log_decay, 0.0)
  # Inside the split (shard_map) the Pallas calls would need their outputs' varying axes declared: "auto" takes the
  # chunked form there.
  kw["impl"] = "chunked" if impl == "auto" else impl
  o, local = gated_linear_recurrence(q, k, v, log_decay, initial_state=_zero_state(q, v, acc), **kw)
  states = jax.lax.all_gather(local.astype(acc), split.axis, to="invarying")  # [P,B,H,K,V]
  cum, totals = None, None
  if log_decay is not None:
    g = log_decay[..., None] if log_decay.ndim == 3 else log_decay
    cum = jnp.cumsum(g.astype(acc), axis=1)  # [B,L,H,1|K]
    totals = jax.lax.all_gather(cum[:, -1], split.axis, to="invarying")
  carries, before_start = None, None
  if resets is not None:
    before_start = jnp.cumsum(resets.astype(jnp.int32), axis=1) == 0  # [B,L]
    carries = jax.lax.all_gather(before_start[:, -1], split.axis, to="invarying")  # [P,B]
  index = jax.lax.axis_index(split.axis)
  if reverse:
    states, totals, carries = (None if a is None else jnp.flip(a, 0) for a in (states, totals, carries))
    index = states.shape[0] - 1 - index
  incoming, final = _combine_states(states, totals, initial_state, carries)
  q_in = q.astype(acc) if cum is None else q.astype(acc) * jnp.exp(cum)
  if before_start is not None:
    q_in = q_in * before_start[:, :, None, None]
  o = (o.astype(acc) + scale * jnp.einsum("blhk,bhkv->blhv", q_in, incoming[index])).astype(o.dtype)
  return (_flip(o) if reverse else o), final


def _varying_like(x, *refs):
  """x made to vary over the manual mesh axes that any of `refs` varies over (a valid scan carry beside them)."""
  varying = lambda a: set(jax.typeof(a).manual_axis_type.varying)
  axes = set().union(*(varying(r) for r in refs)) - varying(x)
  return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def _affine_scan(transitions, inputs, start):
  """S_n = A_n S_{n-1} + B_n from S_0 = start over axis 0: (state entering each step `[N,...]`, final)."""
  def step(s, x):
    a, b = x
    return jnp.matmul(a, s) + b, s

  final, entering = jax.lax.scan(step, _varying_like(start, transitions, inputs), (transitions, inputs))
  return entering, final


def affine_recurrence(transitions, inputs, initial_state=None):
  """The matrix-transition recurrence S_n = A_n S_{n-1} + B_n along axis 1 (steps: tokens or chunks).

  transitions A `[B,N,...,K,K]`, inputs B `[B,N,...,K,V]`, initial_state S_0 `[B,...,K,V]` or None (zeros).
  Returns (the state entering each step `[B,N,...,K,V]`, the final state `[B,...,K,V]`), accumulated in
  float32 or wider. Split: a slice's effect on its incoming state is affine, S -> A_p S + B_p, with A_p the
  product of its transitions and B_p its final state from zero. One local pass from zero yields B_p, the
  zero-start entering states and the running products P_n; slices all-gather (A_p, B_p) (`[K,K]` and `[K,V]`
  per batch and head: never activations), combine them in order from S_0 into the state entering each slice,
  S_in, and correct the entering states as entering_n + P_n S_in (one batched matmul, no second scan).
  """
  dtype = jnp.promote_types(jnp.result_type(transitions, inputs), jnp.float32)
  a = jnp.moveaxis(transitions.astype(dtype), 1, 0)
  b = jnp.moveaxis(inputs.astype(dtype), 1, 0)
  zeros = jnp.zeros(b.shape[1:], dtype)
  start = zeros if initial_state is None else initial_state.astype(dtype)
  split = current_split()
  if split is None:
    entering, final = _affine_scan(a, b, start)
    return jnp.moveaxis(entering, 0, 1), final

  def step(carry, x):
    prod, s = carry
    a_n, b_n = x
    return (jnp.matmul(a_n, prod), jnp.matmul(a_n, s) + b_n), (prod, s)

  eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=dtype), a.shape[1:])
  init = (_varying_like(eye, a, b), _varying_like(zeros, a, b))
  (a_p, b_p), (prods, entering) = jax.lax.scan(step, init, (a, b))
  a_all = jax.lax.all_gather(a_p, split.axis, to="invarying")  # [P,B,...,K,K]
  b_all = jax.lax.all_gather(b_p, split.axis, to="invarying")  # [P,B,...,K,V]
  incoming, final = _affine_scan(a_all, b_all, start)
  s_in = incoming[jax.lax.axis_index(split.axis)]
  entering = entering + jnp.matmul(prods, s_in)
  return jnp.moveaxis(entering, 0, 1), final


def positions(length):
  """Global positions `[T]` of the `length` local tokens (0..T-1 on one device; this slice's when split)."""
  split = current_split()
  return jnp.arange(length) if split is None else split.positions()


def sum_over_time(partial):
  """A sum over every token, given this slice's partial sum (the whole sum on one device)."""
  split = current_split()
  return partial if split is None else jax.lax.psum(partial, split.axis)


def logsumexp_over_time(x):
  """log sum_t exp(x_t) over axis 1 of x `[B,T,...]` -> `[B,...]`."""
  local = jax.scipy.special.logsumexp(x, axis=1)
  split = current_split()
  if split is None:
    return local
  return jax.scipy.special.logsumexp(jax.lax.all_gather(local, split.axis, to="invarying"), axis=0)


def _restarting_logaddexp(first, second):
  """Combines (running log-sum, restarted) of two consecutive spans: the second's sum alone if it restarted."""
  (z1, r1), (z2, r2) = first, second
  return jnp.where(r2, z2, jnp.logaddexp(z1, z2)), r1 | r2


def cumlogsumexp(x, axis):
  """Running log(sum(exp(x))) along `axis` in O(n log n): `jax.lax.cumlogsumexp` lowers to a window as long as the
  axis (quadratic on CPU: 28x slower at T=8192)."""
  return jax.lax.associative_scan(jnp.logaddexp, x, axis=axis)


def logcumsumexp_over_time(x, start, resets=None, reverse=False):
  """Running log-sums z_t = log(exp(start) + sum_{s<=t} exp(x_s)) over axis 1 of x `[B,T,...]`, start `[B,...]`.

  With `resets` (bool `[B,T]`, segment starts) the sum restarts at each start: z_t sums t's segment up to t (and
  `start` only in the first segment). Returns (z `[B,T,...]`, the value entering this slice `[B,...]` (start on
  one device), the total `[B,...]` (the last segment's)). `reverse` (with resets: the reversed pass's segment
  starts, `segment_starts(ids, reverse=True)`) sums from the last token backwards: z_t over s >= t.
  """
  if resets is not None or reverse:
    return _restarting_logcumsumexp(x, start, jnp.zeros(x.shape[:2], bool) if resets is None else resets, reverse)
  split = current_split()
  entering = start
  if split is not None:
    sums = jax.lax.all_gather(jax.scipy.special.logsumexp(x, axis=1), split.axis, to="invarying")  # [P,B,...]
    prefix = cumlogsumexp(jnp.concatenate([start[None].astype(sums.dtype), sums]), axis=0)
    entering = prefix[jax.lax.axis_index(split.axis)]
    total = prefix[-1]
  z = cumlogsumexp(jnp.concatenate([entering[:, None].astype(x.dtype), x], axis=1), axis=1)[:, 1:]
  if split is not None:
    return z, entering, total
  return z, entering, (z[:, -1] if x.shape[1] else start.astype(x.dtype))


def _restarting_logcumsumexp(x, start, resets, reverse):
  if reverse:
    x, resets = _flip(x), _flip(resets)
  r = jnp.broadcast_to(resets.reshape(resets.shape + (1,) * (x.ndim - 2)), x.shape)
  local, restarted = jax.lax.associative_scan(_restarting_logaddexp, (x, r), axis=1)  # from nothing, per slice
  entering = start.astype(x.dtype)
  split = current_split()
  if split is not None:
    sums = jax.lax.all_gather(local[:, -1], split.axis, to="invarying")  # [P,B,...]
    starts = jax.lax.all_gather(restarted[:, -1], split.axis, to="invarying")
    index = jax.lax.axis_index(split.axis)
    if reverse:
      sums, starts, index = jnp.flip(sums, 0), jnp.flip(starts, 0), sums.shape[0] - 1 - index

    def step(z, slice_):
      return _restarting_logaddexp((z, False), slice_)[0], z

    total, entering_each = jax.lax.scan(step, _varying_like(entering, sums, starts), (sums, starts))
    entering = entering_each[index]
  z = jnp.where(restarted, local, jnp.logaddexp(entering[:, None], local))
  if split is None:
    total = z[:, -1] if x.shape[1] else entering
  return (_flip(z) if reverse else z), entering, total


def shift(x, offset):
  """x `[B,T,...]` moved along time: offset 1 gives y_t = x_{t-1} (y_0 = 0), offset -1 gives y_t = x_{t+1}
  (zero at the end)."""
  if offset not in (1, -1):
    raise ValueError(f"offset must be 1 or -1, got {offset!r}")
  if x.shape[1] == 0:
    return x
  split = current_split()
  if offset == 1:
    boundary = jnp.zeros_like(x[:, :1]) if split is None else _neighbour_row(x[:, -1], split.axis, -1)
    return jnp.concatenate([boundary, x[:, :-1]], axis=1)
  boundary = jnp.zeros_like(x[:, :1]) if split is None else _neighbour_row(x[:, 0], split.axis, 1)
  return jnp.concatenate([x[:, 1:], boundary], axis=1)


def _neighbour_row(row, axis, step):
  """`row` `[B,...]` of the slice `step` places away, `[B,1,...]`; zeros past either end."""
  rows = jax.lax.all_gather(row, axis)  # [P,B,...]
  size = rows.shape[0]
  source = jax.lax.axis_index(axis) + step
  picked = rows[jnp.clip(source, 0, size - 1)]
  return jnp.where((source >= 0) & (source < size), picked, jnp.zeros_like(picked))[:, None]


# ----------------------------------------------------------------------------------------------------
# ops that split along time


@dataclasses.dataclass(frozen=True)
class TimeArgs:
  """An op's arguments cut along time (`names`: axis 1 of each array leaf of length T, batch first), the
  batch-first arguments that are not (`batched`: states, lengths), and, where padding must be masked out
  rather than zero-filled, the boolean `[B,*T]` mask argument that marks real tokens (`pad_mask`)."""
  names: tuple[str, ...]
  batched: tuple[str, ...]
  pad_mask: str | None
  fn: Callable
  signature: inspect.Signature


_DECLARED: dict[str, Callable] = {}


def splits_time(*names: str, batched: tuple[str, ...] = (), pad_mask: str | None = None):
  """Declares op arguments `names` as split along time (the first one's axis 1 is T); see `TimeArgs`."""
  def wrap(fn):
    declared = TimeArgs(tuple(names), tuple(batched), pad_mask, fn, inspect.signature(fn))

    @functools.wraps(fn)
    def op(*args, **kwargs):
      mesh = None if current_split() is not None else active_sequence_mesh()
      if mesh is not None:
        first = declared.signature.bind(*args, **kwargs).arguments[names[0]]
        size = mesh.shape[SEQUENCE_AXIS]
        if first.ndim >= 3 and first.shape[1] >= size and first.shape[1] % size == 0:
          return split_time(op, mesh, SEQUENCE_AXIS, *args, **kwargs)
      return fn(*args, **kwargs)

    op.time_args = declared
    _DECLARED[fn.__name__] = op
    return op
  return wrap


def declared_ops() -> tuple[str, ...]:
  return tuple(sorted(_DECLARED))


def time_args_of(op) -> TimeArgs | None:
  """The declaration of `op` (also through `functools.partial`), or None."""
  while isinstance(op, functools.partial):
    op = op.func
  return getattr(op, "time_args", None)


def active_sequence_mesh(axis: str = SEQUENCE_AXIS):
  """The mesh set by `jax.set_mesh` if it has `axis` larger than 1 and not already manual, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get(axis, 1) <= 1 or axis in mesh.manual_axes:
    return None
  return mesh


def _is_array(x):
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _pad_time(x, length, value=0):
  pad = length - x.shape[1]
  return x if pad == 0 else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _batch_axes(mesh, batch, axis):
  """The mesh axes of BATCH_AXES that split a batch of `batch` (dropped from the last until they divide it)."""
  axes = tuple(a for a in BATCH_AXES if a != axis and mesh.shape.get(a, 1) > 1 and a not in mesh.manual_axes)
  while axes and batch % math.prod(mesh.shape[a] for a in axes):
    axes = axes[:-1]
  return axes


def split_time(op, mesh, axis, *args, **kwargs):
  """Calls the declared `op` with its time arguments cut along `axis` of `mesh` (T padded to a multiple of
  the axis size); the output (or an `(output, state)` pair with `return_state`) comes back whole along T.

  Inside, the time axis and the batch axes (BATCH_AXES that divide B) are manual; the others, such as a
  `tensor` axis over heads, stay automatic.
  """
  declared = time_args_of(op)
  if declared is None:
    raise ValueError(f"{getattr(op, '__name__', op)!r} declares no time arguments; ops that split along time: "
                     f"{list(declared_ops())}")
  if isinstance(op, functools.partial):
    args, kwargs = op.args + args, {**op.keywords, **kwargs}
  bound = declared.signature.bind(*args, **kwargs)
  bound.apply_defaults()
  values = dict(bound.arguments)
  first = values[declared.names[0]]
  if not _is_array(first) or first.ndim < 2:
    raise ValueError(f"{declared.names[0]} must be an array [B,T,...] to split along time, got "
                     f"{getattr(first, 'shape', type(first).__name__)}")
  b, t, size = first.shape[0], first.shape[1], mesh.shape[axis]
  padded = -(-t // size) * size
  if declared.pad_mask and padded != t:
    mask = values[declared.pad_mask]
    values[declared.pad_mask] = jnp.ones(first.shape[:-2], bool) if mask is None else jnp.asarray(mask, bool)
  timed = set(declared.names) | {declared.pad_mask}
  cut = lambda name, x: name in timed and x.ndim >= 2 and x.shape[1] == t
  for name in timed - {None}:
    values[name] = jax.tree.map(lambda x: _pad_time(x, padded) if _is_array(x) and cut(name, x) else x,
                                values[name])
  batch = _batch_axes(mesh, b, axis) or None
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(values, is_leaf=lambda x: x is None)
  leaves = [x for _, x in path_leaves]
  dynamic = [i for i, x in enumerate(leaves) if _is_array(x)]

  def spec(path, x):
    name = path[0].key
    in_time = name in timed and x.ndim >= 2 and x.shape[1] == padded
    # a timed argument without its time axis (a per-head D `[H]`) is not batch-first, even when H == B
    batched = (in_time or name in declared.batched) and x.ndim >= 1 and x.shape[0] == b
    return P(batch if batched else None, axis) if in_time else P(batch if batched else None)

  in_specs = tuple(spec(path_leaves[i][0], leaves[i]) for i in dynamic)
  with_state = bool(values.get("return_state", False))
  out_specs = (P(batch, axis), P(batch)) if with_state else P(batch, axis)

  def body(*arrays):
    local = list(leaves)
    for i, a in zip(dynamic, arrays):
      local[i] = a
    with _splitting(Split(axis, t, padded // size, size)):
      return declared.fn(**jax.tree.unflatten(treedef, local))

  manual = {axis} | set(batch or ())
  out = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=manual)(
      *[leaves[i] for i in dynamic])
  if with_state:
    return out[0][:, :t], out[1]
  return out[:, :t]
