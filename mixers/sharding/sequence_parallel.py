"""Sequence parallelism for the recurrent mixers: `[B,T,...]` arrays split along T over a mesh axis.

`sequence_parallel(op, mesh)` returns a function with `op`'s signature. Inside `jax.shard_map` every
device runs the chunked recurrence on its slice from a zero state; the slices' final states and total
decays (never activations) are all-gathered, combined as a prefix on every device, and each slice adds
its incoming state's contribution (see `slice_scan`). Non-causal forms without decay reduce their
global state with a `psum`. Batch and heads stay split over the axes the logical rules give them.

Each op has an adapter that maps its arguments onto (q, k, v, log_decay, scale) of the core and back.
"""
from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from flax.linen import spmd as nn_rules

from mixers.sharding import rules as rules_lib
from mixers.sharding.slice_scan import reverse_strict_scan, slice_scan

_ADAPTERS: dict[str, Callable] = {}


def register_adapter(name: str):
  """Registers `make(layout) -> fn` as the sequence-parallel form of the op called `name`."""
  def wrap(make):
    _ADAPTERS[name] = make
    return make
  return wrap


def supported_ops() -> tuple[str, ...]:
  return tuple(sorted(_ADAPTERS))


class Layout:
  """Which mesh axes split batch, time and heads, given the mesh, the rules and the array sizes."""

  def __init__(self, mesh: Mesh, axis: str, rules):
    if axis not in mesh.shape:
      raise ValueError(f"axis {axis!r} is not a mesh axis; the mesh has {dict(mesh.shape)}")
    self.mesh, self.axis, self.rules = mesh, axis, rules
    self.size = mesh.shape[axis]

  def _fit(self, logical: str, dim: int):
    axes = tuple(a for a in rules_lib.mesh_axes_for(logical, self.mesh, self.rules) if a != self.axis)
    while axes and dim % math.prod(self.mesh.shape[a] for a in axes):
      axes = axes[:-1]
    return axes or None

  def specs(self, batch: int, heads: int | None):
    """(batch axes, head axes) for shard_map specs."""
    return self._fit("batch", batch), (None if heads is None else self._fit("heads", heads))

  def padded_length(self, t: int) -> int:
    return -(-t // self.size) * self.size

  def shard_map(self, body, in_specs, out_specs):
    return jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)


def pad_time(x, length):
  """Zero-pads `[B,T,...]` to `[B,length,...]`; zero keys, values and log-decays leave every state unchanged."""
  if x is None or x.shape[1] == length:
    return x
  return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def sequence_parallel(op: Callable, mesh: Mesh, axis: str = "sequence", *,
                      rules=rules_lib.DEFAULT_RULES) -> Callable:
  """`op` (one of `mixers.ops.linear_attention`, `ssd`, `quasiseparable`, `lightnet`) with its `[B,T,...]`
  inputs and outputs split along T over mesh axis `axis`.

  Any T works: a T that the axis size does not divide is zero-padded at the end (which changes no
  real token's output or the final state). Results equal the single-device op's.
  """
  name = getattr(op, "__name__", str(op))
  if name not in _ADAPTERS:
    raise ValueError(f"sequence_parallel has no form for op {name!r}; supported: {list(supported_ops())}")
  fn = _ADAPTERS[name](Layout(mesh, axis, rules))
  return functools.wraps(op)(fn)


def active_sequence_mesh(axis: str = "sequence"):
  """The mesh set by `jax.set_mesh` / `use_mesh` if it has `axis` larger than 1 (not already manual), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get(axis, 1) <= 1 or axis in mesh.manual_axes:
    return None
  return mesh


def maybe_sequence_parallel(op: Callable, axis: str = "sequence") -> Callable:
  """`op`, run sequence-parallel when the active mesh splits `axis` (see `sequence_parallel`).

  Decided at call time: with no such mesh, or a length (axis 1 of the first argument) that the axis
  size does not divide (decoding a token, a short prompt), the plain `op` runs.
  """
  @functools.wraps(op)
  def fn(*args, **kwargs):
    mesh = active_sequence_mesh(axis)
    if mesh is None or args[0].ndim < 4 or args[0].shape[1] % mesh.shape[axis]:
      return op(*args, **kwargs)
    rules = nn_rules.get_logical_axis_rules() or rules_lib.DEFAULT_RULES
    return sequence_parallel(op, mesh, axis, rules=rules)(*args, **kwargs)
  return fn


# ----------------------------------------------------------------------------------------------------
# linear attention


def _pair_to_augmented(state, normalize):
  """(S [B,H,K,V], z [B,H,K]) -> S_aug [B,H,K,V+1]; plain S passes through."""
  if state is None or not normalize:
    return state
  s, z = state
  return jnp.concatenate([s, z[..., None].astype(s.dtype)], axis=-1)


def _with_ones(v):
  return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


def _normalized(o_aug, scale_unused, eps):
  return o_aug[..., :-1] / (o_aug[..., -1:] + eps)


@register_adapter("linear_attention")
def _linear_attention(layout: Layout):
  from mixers.ops.recurrence import shapes  # pylint: disable=import-outside-toplevel

  def fn(q, k, v, *, causal=True, log_decay=None, normalize=False, scale=None, eps=1e-6,
         initial_state=None, return_state=False, chunk_size=64, impl="auto"):
    shapes.check_qkv(q, k, v)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    if return_state and not causal:
      raise ValueError("return_state=True needs causal=True (a non-causal op has no final state)")
    if initial_state is not None and not causal:
      raise ValueError("initial_state needs causal=True")
    if log_decay is not None:
      log_decay = jnp.asarray(log_decay)
      if log_decay.shape not in ((h,), (b, t, h), (b, t, h, dk)):
        raise ValueError(f"log_decay must have shape None, [H]=({h},), [B,T,H]={(b, t, h)} or "
                         f"[B,T,H,K]={(b, t, h, dk)}, got {tuple(log_decay.shape)}")
    s0 = _pair_to_augmented(initial_state, normalize)
    if s0 is not None:
      expect = (b, h, dk, dv + (1 if normalize else 0))
      if s0.shape != expect:
        raise ValueError(f"initial_state must be {'the pair (S [B,H,K,V], z [B,H,K])' if normalize else '[B,H,K,V]'}"
                         f" for B,H,K,V = {(b, h, dk, dv)}, got shape {tuple(s0.shape)}")
    per_head_decay = log_decay is not None and log_decay.ndim == 1
    tp = layout.padded_length(t)
    q, k, v = (pad_time(x, tp) for x in (q, k, v))
    if normalize:
      v = _with_ones(v) * (jnp.arange(tp) < t)[None, :, None, None].astype(v.dtype)
    g = log_decay if per_head_decay else pad_time(log_decay, tp)
    bax, hax = layout.specs(b, h)
    seq = P(bax, layout.axis, hax, None)
    gspec = None if g is None else (P(hax) if per_head_decay else P(bax, layout.axis, hax, *([None] * (g.ndim - 3))))
    sspec = P(bax, hax, None, None)

    def body(q, k, v, g, s0):
      if g is not None and g.ndim == 1:  # per head: broadcast locally, 0 on the padding
        local = q.shape[1]
        real = jax.lax.axis_index(layout.axis) * local + jnp.arange(local) < t
        g = jnp.where(real[None, :, None], g, 0.0) * jnp.ones(q.shape[:3], g.dtype)
      if causal:
        o, final = slice_scan(q, k, v, g, axis=layout.axis, scale=scale, initial_state=s0,
                              chunk_size=chunk_size, impl=impl)
      elif g is None:
        acc = jnp.promote_types(q.dtype, jnp.float32)
        state = jax.lax.psum(jnp.einsum("blhk,blhv->bhkv", k.astype(acc), v.astype(acc)), layout.axis)
        o, final = scale * jnp.einsum("blhk,bhkv->blhv", q.astype(acc), state), None
      else:
        o, final = slice_scan(q, k, v, g, axis=layout.axis, scale=scale, chunk_size=chunk_size, impl=impl)
        o = o + reverse_strict_scan(q, k, v, g, axis=layout.axis, scale=scale, chunk_size=chunk_size, impl=impl)
        final = None
      if normalize:
        o = _normalized(o, scale, eps)
      return o, final

    out_specs = (seq, sspec if causal else None)
    o, final = layout.shard_map(body, in_specs=(seq, seq, seq, gspec, None if s0 is None else sspec),
                                out_specs=out_specs)(q, k, v, g, s0)
    o = o[:, :t].astype(jnp.result_type(q, k, v))
    if not return_state:
      return o
    if normalize:
      final = (final[..., :-1], final[..., -1])
    return o, final

  return fn


# ----------------------------------------------------------------------------------------------------
# SSD (Mamba2, VSSD) and Hydra's quasiseparable mixer: q = C, k = B (groups read per head), v = dt x,
# log-decay = dt A, scale 1. Heads stay whole on every device (groups map onto them locally).


def _ssd_core_inputs(x, dt, A, B, C):
  from mixers.ops.ssd import heads_from_groups  # pylint: disable=import-outside-toplevel
  h = x.shape[2]
  acc = jnp.promote_types(jnp.result_type(x, dt, B, C), jnp.float32)
  dt = dt.astype(acc)
  q, k = heads_from_groups(C, h).astype(acc), heads_from_groups(B, h).astype(acc)
  return q, k, dt[..., None] * x.astype(acc), dt * A.astype(acc)


def _skip(y, x, D):
  return y if D is None else y + D[..., None].astype(y.dtype) * x.astype(y.dtype)


@register_adapter("ssd")
def _ssd(layout: Layout):
  from mixers.ops.ssd import check_ssd_inputs  # pylint: disable=import-outside-toplevel

  def fn(x, dt, A, B, C, *, D=None, causal=True, chunk_size=64, initial_state=None, return_state=False,
         impl="auto"):
    b, t, h, p, _, n = check_ssd_inputs(x, dt, A, B, C, D)
    if not causal and (initial_state is not None or return_state):
      raise ValueError("initial_state and return_state need causal=True (the non-causal SSD has no running state)")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
      raise ValueError(f"initial_state must have shape [B,H,P,N] = {(b, h, p, n)}, got {tuple(initial_state.shape)}")
    tp = layout.padded_length(t)
    x, dt, B, C = (pad_time(a, tp) for a in (x, dt, B, C))  # dt = 0 on the padding: no write, no decay
    per_token_d = D is not None and D.ndim == 3
    if per_token_d:
      D = pad_time(D, tp)
    bax, _ = layout.specs(b, None)
    seq = lambda nd: P(bax, layout.axis, *([None] * (nd - 2)))
    s0 = None if initial_state is None else jnp.swapaxes(initial_state, -1, -2)  # core keeps [B,H,N,P]
    sspec = P(bax, None, None, None)
    dspec = None if D is None else (seq(3) if per_token_d else P())

    def body(x, dt, A, B, C, D, s0):
      q, k, v, g = _ssd_core_inputs(x, dt, A, B, C)
      if causal:
        y, final = slice_scan(q, k, v, g, axis=layout.axis, scale=1.0, initial_state=s0,
                              chunk_size=chunk_size, impl=impl)
      else:
        state = jax.lax.psum(jnp.einsum("blhn,blhp->bhnp", k, v * -A.astype(v.dtype)[:, None]), layout.axis)
        y, final = jnp.einsum("blhn,bhnp->blhp", q, state), None
      return _skip(y, x, D), final

    y, final = layout.shard_map(body, in_specs=(seq(4), seq(3), P(), seq(4), seq(4), dspec,
                                                None if s0 is None else sspec),
                                out_specs=(seq(4), sspec if causal else None))(x, dt, A, B, C, D, s0)
    y = y[:, :t].astype(x.dtype)
    return (y, jnp.swapaxes(final, -1, -2)) if return_state else y

  return fn


@register_adapter("quasiseparable")
def _quasiseparable(layout: Layout):
  from mixers.ops.quasiseparable import _check, token_mask  # pylint: disable=import-outside-toplevel
  from mixers.sharding.slice_scan import next_slice_first, previous_slice_last  # pylint: disable=import-outside-toplevel

  def fn(x, dt, A, B, C, *, D=None, chunk_size=64, impl="auto", mask=None, lengths=None):
    dtf, dtb, bf, bb, cf, cb = _check(x, dt, A, B, C, D)  # pylint: disable=protected-access
    bsz, t = x.shape[:2]
    keep = token_mask(mask, lengths, bsz, t)
    if keep is not None:
      x = jnp.where(keep[..., None, None], x, 0)
      dtf, dtb = (jnp.where(keep[..., None], d, 0) for d in (dtf, dtb))
    tp = layout.padded_length(t)
    x, dtf, dtb, bf, bb, cf, cb = (pad_time(a, tp) for a in (x, dtf, dtb, bf, bb, cf, cb))
    per_token_d = D is not None and D.ndim == 3
    if per_token_d:
      D = pad_time(D, tp)
    bax, _ = layout.specs(bsz, None)
    seq = lambda nd: P(bax, layout.axis, *([None] * (nd - 2)))
    dspec = None if D is None else (seq(3) if per_token_d else P())
    flip = lambda a: jnp.flip(a, axis=1)
    kw = dict(axis=layout.axis, scale=1.0, chunk_size=chunk_size, impl=impl)

    def body(x, dtf, dtb, A, bf, bb, cf, cb, D):
      yf, _ = slice_scan(*_ssd_core_inputs(x, dtf, A, bf, cf), **kw)
      yf = jnp.concatenate([previous_slice_last(yf, layout.axis), yf[:, :-1]], axis=1)  # shift down one token
      q, k, v, g = (flip(a) for a in _ssd_core_inputs(x, dtb, A, bb, cb))
      yb, _ = slice_scan(q, k, v, g, reverse_order=True, **kw)
      yb = flip(yb)
      yb = jnp.concatenate([yb[:, 1:], next_slice_first(yb, layout.axis)], axis=1)  # shift up one token
      return _skip(yf + yb, x, D)

    y = layout.shard_map(body, in_specs=(seq(4), seq(3), seq(3), P(), seq(4), seq(4), seq(4), seq(4), dspec),
                         out_specs=seq(4))(x, dtf, dtb, A, bf, bb, cf, cb, D)
    y = y[:, :t]
    if keep is not None:
      y = jnp.where(keep[..., None, None], y, 0)
    return y.astype(x.dtype)

  return fn


# ----------------------------------------------------------------------------------------------------
# LightNet: keys normalised by a running (causal) or global (non-causal) softmax over positions. Only the
# per-slice log-sums of exp(k) `[B,H,K]` and the states cross devices; the slice's normaliser entering it
# (z_in) is the log-add-exp of the initial state's and all earlier slices' log-sums.


@register_adapter("lightnet")
def _lightnet(layout: Layout):
  ln = importlib.import_module("mixers.ops.lightnet")  # the module: `mixers.ops.lightnet` names the function
  from mixers.ops.recurrence import IMPLS  # pylint: disable=import-outside-toplevel
  from mixers.ops import checks  # pylint: disable=import-outside-toplevel

  def local_log_sums(km):
    """Per-slice log sum of exp(k) `[B,H,K]` of every slice, `[P,B,H,K]` on every device."""
    return jax.lax.all_gather(jax.scipy.special.logsumexp(km, axis=1), layout.axis, to="invarying")

  def fn(q, k, v, *, causal=True, scale=None, initial_state=None, return_state=False, mask=None, phases=None,
         chunk_size=64, impl="auto"):
    checks.check_choice("impl", impl, IMPLS)
    ln._check_inputs(q, k, v, causal, mask, phases)  # pylint: disable=protected-access
    key_dim = q.shape[-1] * (1 if phases is None else 2)
    ln._check_state(initial_state, q, v, key_dim)  # pylint: disable=protected-access
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    grid = q.shape[:-2]
    b, h, dk, dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    if phases is not None:
      phases = jnp.broadcast_to(phases, q.shape).reshape(b, -1, h, dk)
    if mask is not None:
      mask = mask.reshape(b, -1)
    q, k, v = q.reshape(b, -1, h, dk), k.reshape(b, -1, h, dk), v.reshape(b, -1, h, dv)  # grids: order-free
    t = q.shape[1]
    tp = layout.padded_length(t)
    if tp != t:  # padded positions are masked out of every sum
      mask = pad_time(jnp.ones((b, t), bool) if mask is None else mask, tp)
    q, k, v, phases = (pad_time(x, tp) for x in (q, k, v, phases))
    s0, z0 = (None, None) if initial_state is None else initial_state
    bax, hax = layout.specs(b, h)
    seq = P(bax, layout.axis, hax, None)
    mspec = None if mask is None else P(bax, layout.axis)
    sspec, zspec = P(bax, hax, None, None), P(bax, hax, None)

    def body(q, k, v, mask, phases, s0, z0):
      km = ln._masked_keys(k, mask)  # pylint: disable=protected-access
      if mask is not None:
        v = jnp.where(mask[..., None, None], v, 0)
      log_sums = local_log_sums(km)
      start = jnp.full_like(log_sums[:1], ln._LOG_ZERO) if z0 is None else (  # pylint: disable=protected-access
          jnp.maximum(z0.astype(km.dtype), ln._LOG_ZERO)[None])  # pylint: disable=protected-access
      q_in = ln._expand(q.astype(km.dtype), phases)  # pylint: disable=protected-access
      if causal:
        prefix = jax.lax.cumlogsumexp(jnp.concatenate([start, log_sums]), axis=0)  # [P+1,B,H,K]
        z_in, z = prefix[jax.lax.axis_index(layout.axis)], prefix[-1]
        k_norm, log_decay, _ = ln.causal_keys(k, log_sum=z_in, mask=mask)
        o, s = slice_scan(q_in, ln._expand(k_norm, phases), v,  # pylint: disable=protected-access
                          ln._repeat_channels(log_decay, phases), axis=layout.axis,  # pylint: disable=protected-access
                          scale=scale, initial_state=s0, chunk_size=chunk_size, impl=impl)
      else:
        z = jax.scipy.special.logsumexp(jnp.concatenate([start, log_sums]), axis=0)
        k_norm = jnp.exp(km - z[:, None])
        if mask is not None:
          k_norm = jnp.where(mask[..., None, None], k_norm, 0.0)
        s = jax.lax.psum(jnp.einsum("blhk,blhv->bhkv", ln._expand(k_norm, phases),  # pylint: disable=protected-access
                                    v.astype(km.dtype)), layout.axis)
        if s0 is not None:
          carry = jnp.exp(start[0] - z)
          s = s + ln._repeat_channels(carry, phases)[..., None] * s0.astype(s.dtype)  # pylint: disable=protected-access
        o = scale * jnp.einsum("blhk,bhkv->blhv", q_in, s)
      return o, s, jnp.where(z <= ln._LOG_ZERO / 2, -jnp.inf, z)  # pylint: disable=protected-access

    o, s, z = layout.shard_map(
        body, in_specs=(seq, seq, seq, mspec, None if phases is None else seq,
                        None if s0 is None else sspec, None if z0 is None else zspec),
        out_specs=(seq, sspec, zspec))(q, k, v, mask, phases, s0, z0)
    o = o[:, :t].reshape(grid + (h, dv)).astype(jnp.result_type(q, k, v))
    return (o, (s, z)) if return_state else o

  return fn
