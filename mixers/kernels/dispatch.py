"""`chunked_recurrence`: the Pallas chunked gated linear recurrence with its custom VJP.

`S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`, `o_t = scale * q_t^T S_t`; q, k `[B,T,H,K]`, v `[B,T,H,V]`,
g None | `[B,T,H]` | `[B,T,H,K]` (<= 0), state `[B,H,K,V]` float32. Packed sequences: `resets` bool `[B,T]` marks
the tokens where a segment starts (S_{t-1} is replaced by zeros there); the kernels then take one more operand,
the in-chunk segment counter r (`chunk_segment_index`), and mask pairs, the state read and the state write by it
(see `chunk_math`). Without resets nothing is added to the kernels.

The backend is picked when the function is lowered (`lax.platform_dependent`): the Mosaic kernel for
`tpu`, the Triton kernel for `cuda`, the token-loop reference anywhere else, so
`jax.export(..., platforms=["tpu"])` on a CPU machine lowers the TPU kernel. `backend="tpu"|"gpu"` forces a
kernel (with `interpret=True` it runs on CPU).

Gradients: dq, dk, dv and dS0 come from backward kernels (TPU: dq walks the chunks forward recomputing the state,
dk, dv, dS0 walk them backward carrying dS; GPU: the state pass again, a reverse pass storing dS at every chunk
edge, then one chunk-parallel kernel for dq, dk and dv, see `chunk_gpu`). The log-decay gradient needs no kernel: with
`c_t = sum_{r<=t} g_r`, the output depends on c only through `q_t * e^{c_t}` and `k_s * e^{-c_s}`, plus
`e^{c_T}` scaling the final state's rows, so `dL/dc_t = q_t * dq_t - k_t * dk_t (+ rowsum(S_T * dS_T) at
t = T)` and `dg_t = sum_{t' >= t} dL/dc_t'` (summed over K for a scalar decay). Resets keep this true: inside a
segment pairs still weigh `e^{c_t - c_s}`, S0 reaches the first segment through `q_t e^{c_t}` and the final state
is `e^{c_T}` times a function of the last segment's `k_s e^{-c_s}` (and of S0 when nothing starts).
"""
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from mixers.kernels import chunk_gpu
from mixers.kernels import chunk_tpu
from mixers.kernels.reference import recurrence_reference
from mixers.ops.recurrence.reference import chunk_segment_index
from mixers.ops.recurrence.shapes import heads_from_groups

BACKENDS = ("tpu", "gpu")


class KernelConfig(NamedTuple):
  """The static arguments of one kernel call (hashable: the custom VJP's non-differentiable argument)."""
  scale: float
  chunk: int
  per_channel: bool
  interpret: bool
  backend: Optional[str]  # "tpu" | "gpu", or None: chosen per platform at lowering
  group: int = 1  # heads per group of q and k (SSD's B and C): head h reads q and k's group h // group
  tuning: Optional[tuple] = None  # GPU: ((phase, num_warps, num_stages), ...), see `chunk_gpu.check_tuning`
_PLATFORM_TO_BACKEND = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu"}


def _check_inputs(q, k, v, log_decay, initial_state, chunk_size, resets=None):
  """Raises ValueError on a bad shape; returns whether the decay is per key channel."""
  if q.ndim != 4:
    raise ValueError(f"q must be [B,T,G,K], got shape {q.shape}")
  b, t, groups, dk = q.shape
  if k.shape != q.shape:
    raise ValueError(f"k must have q's shape {q.shape}, got {k.shape}")
  if v.ndim != 4 or v.shape[:2] != (b, t) or v.shape[2] % groups:
    raise ValueError(f"v must be [B,T,H,V] = [{b},{t},H,V] with H a multiple of q's {groups} groups, got shape "
                     f"{v.shape}")
  h = v.shape[2]
  if log_decay is not None and log_decay.shape not in ((b, t, h), (b, t, h, dk)):
    raise ValueError(f"log_decay must be None, [B,T,H] = {(b, t, h)} or [B,T,H,K] = "
                     f"{(b, t, h, dk)}, got shape {log_decay.shape}")
  if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
    raise ValueError(f"initial_state must be [B,H,K,V] = {(b, h, dk, v.shape[-1])}, "
                     f"got shape {initial_state.shape}")
  if resets is not None and tuple(resets.shape) != (b, t):
    raise ValueError(f"resets must be bool [B,T] = {(b, t)}, got shape {tuple(resets.shape)}")
  if not isinstance(chunk_size, int) or chunk_size <= 0 or t % chunk_size:
    raise ValueError(f"T = {t} (q shape {q.shape}) must be a multiple of chunk_size = "
                     f"{chunk_size}; pad the sequence first")
  return log_decay is not None and log_decay.ndim == 4


def supports(q, k, v, log_decay=None, chunk_size=64, backend=None):
  """Whether a kernel exists for these shapes on `backend` ("tpu" | "gpu"; None: the default backend).

  Takes arrays or `jax.ShapeDtypeStruct`s; never raises for a shape it cannot handle.
  """
  backend = _PLATFORM_TO_BACKEND.get(backend or jax.default_backend())
  if backend is None:
    return False
  try:
    per_channel = _check_inputs(q, k, v, log_decay, None, chunk_size)
  except ValueError:
    return False
  if q.dtype != k.dtype or q.dtype != v.dtype:
    return False
  check = chunk_tpu.supports_tpu if backend == "tpu" else chunk_gpu.supports_gpu
  return check(q.shape[1], q.shape[3], v.shape[3], chunk_size, q.dtype, per_channel)


def chunked_recurrence(q, k, v, log_decay, *, scale, initial_state, chunk_size, interpret=False,
                       backend=None, resets=None, tuning=None):
  """Chunked gated linear recurrence on Pallas kernels; returns (o in q's dtype, final state f32).

  Args:
    q, k: `[B,T,G,K]`; v: `[B,T,H,V]`, H a multiple of G (head h reads group h // (H // G): SSD's B and C are
      indexed by group inside the kernel, never broadcast to heads); T a multiple of chunk_size (ValueError
      otherwise).
    log_decay: None, `[B,T,H]` (per token and head) or `[B,T,H,K]` (per key channel), all <= 0.
    scale: multiplies q. initial_state: None or `[B,H,K,V]` (float32).
    chunk_size: tokens per chunk (see `supports` for what each backend accepts).
    interpret: run the kernel in the Pallas interpreter (CPU); backend defaults to "gpu" then.
    backend: "tpu" | "gpu" forces that kernel; None picks it per platform at lowering time.
    resets: None or bool `[B,T]` (packed sequences): True where a segment starts; each segment is computed as
      its own sequence (initial_state reaches the first, the final state is the last one's).
    tuning: the GPU kernels' warps and pipeline stages per phase, ((phase, num_warps, num_stages), ...) (None: 4
      warps, 1 stage; `chunk_gpu.check_tuning`); the TPU kernels ignore it.
  Returns:
    o `[B,T,H,V]` (q's dtype), final state `[B,H,K,V]` float32.
  """
  per_channel = _check_inputs(q, k, v, log_decay, initial_state, chunk_size, resets)
  if backend not in (None,) + BACKENDS:
    raise ValueError(f"backend must be None, 'tpu' or 'gpu', got {backend!r}")
  if interpret and backend is None:
    backend = "gpu"
  b, t, groups, dk = q.shape
  h = v.shape[2]
  g = (jnp.zeros((b, t, h), jnp.float32) if log_decay is None else log_decay)
  s0 = (jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  tuning = chunk_gpu.check_tuning(None if tuning is None else tuple(tuple(item) for item in tuning))
  config = KernelConfig(float(scale), chunk_size, per_channel, bool(interpret), backend, h // groups, tuning)
  starts = None if resets is None else resets.astype(jnp.float32)  # a float operand: its cotangent is zeros
  return _recurrence(config, q, k, v.astype(q.dtype), g, s0, starts)


# ---------------------------------------------------------------------------------------------------
# Layout: GPU kernels read [B,T,H,D] (padded to a power of two); TPU kernels rows [B*H, T, D] (padded to lanes).


def _padded(backend, d):
  return -(-d // chunk_tpu.LANES) * chunk_tpu.LANES if backend == "tpu" else chunk_gpu.padded_width(d)


def _pad_last(x, width):
  return x if x.shape[-1] == width else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def _to_rows(x, width):
  b, t, h, d = x.shape
  return _pad_last(x.transpose(0, 2, 1, 3).reshape(b * h, t, d), width)


def _from_rows(x, b, h, d):
  return x[..., :d].reshape(b, h, x.shape[1], d).transpose(0, 2, 1, 3)


def _to_layout(backend, x, width):
  """x `[B,T,H,D]` as the backend's kernels read it: GPU `[B,T,H,width]` (padded), TPU rows `[B*H,T,width]`."""
  return _pad_last(x, width) if backend == "gpu" else _to_rows(x, width)


def _from_layout(backend, x, b, h, d):
  return x[..., :d] if backend == "gpu" else _from_rows(x, b, h, d)


def _pad_state(s, kp, vp):
  b, h, dk, dv = s.shape
  return jnp.pad(s.reshape(b * h, dk, dv), ((0, 0), (0, kp - dk), (0, vp - dv)))


def _segment_rows(resets, chunk, heads):
  """The in-chunk segment counter as float32 rows `[B*H, T, 1]` (None without resets)."""
  if resets is None:
    return None
  b, t = resets.shape
  r = chunk_segment_index(resets, chunk).reshape(b, 1, t).astype(jnp.float32)
  return jnp.broadcast_to(r, (b, heads, t)).reshape(b * heads, t, 1)


def _prepare(backend, config, q, k, v, g, s0):
  """Kernel operands: q, k, v in the backend's layout, the within-chunk cumulative decay and its auxiliary rows."""
  chunk, per_channel = config.chunk, config.per_channel
  b, t, _, dk = q.shape
  h = v.shape[2]
  kp, vp = _padded(backend, dk), _padded(backend, v.shape[-1])
  n = t // chunk
  if per_channel:
    gc = _pad_last(g.astype(jnp.float32), kp).reshape(b, n, chunk, h, kp).cumsum(2)
    aux = gc[:, :, -1].transpose(0, 2, 1, 3).reshape(b * h, n * kp, 1)
    gc = _to_layout(backend, gc.reshape(b, t, h, kp), kp)
  else:
    gc = g.astype(jnp.float32).transpose(0, 2, 1).reshape(b * h, n, chunk).cumsum(2)
    aux = gc.reshape(b * h, n, 1, chunk) if backend == "tpu" else gc.reshape(b * h, 1, t)
    gc = gc.reshape(b * h, t, 1)
  return (_to_layout(backend, q, kp), _to_layout(backend, k, kp), _to_layout(backend, v, vp), gc, aux,
          _pad_state(s0, kp, vp))


def _module(backend):
  return chunk_tpu if backend == "tpu" else chunk_gpu


def _backend_kwargs(backend, config):
  return {} if backend == "tpu" else {"tuning": config.tuning}


def _kernel_forward(backend, config, q, k, v, g, s0, resets):
  b, _, h, dv = v.shape
  dk = q.shape[-1]
  o, st = _module(backend).forward(*_prepare(backend, config, q, k, v, g, s0), scale=config.scale,
                                   chunk=config.chunk, per_channel=config.per_channel, interpret=config.interpret,
                                   r=_segment_rows(resets, config.chunk, h), group=config.group,
                                   **_backend_kwargs(backend, config))
  return _from_layout(backend, o, b, h, dv), st[:, :dk, :dv].reshape(b, h, dk, dv)


def _kernel_backward(backend, config, q, k, v, g, s0, resets, do, ds):
  """(dq, dk per head `[B,T,H,K]`, dv, dS0): the group sums are taken by the caller."""
  b, _, h, dv = v.shape
  dk = q.shape[-1]
  ops = _prepare(backend, config, q, k, v, g, s0)
  kp, vp = ops[0].shape[-1], ops[2].shape[-1]
  dq, dk_, dv_, ds0 = _module(backend).backward(
      *ops, _to_layout(backend, do.astype(q.dtype), vp), _pad_state(ds, kp, vp), scale=config.scale,
      chunk=config.chunk, per_channel=config.per_channel, interpret=config.interpret,
      r=_segment_rows(resets, config.chunk, h), group=config.group, **_backend_kwargs(backend, config))
  return (_from_layout(backend, dq, b, h, dk), _from_layout(backend, dk_, b, h, dk),
          _from_layout(backend, dv_, b, h, dv), ds0[:, :dk, :dv].reshape(b, h, dk, dv))


def _reference_forward(config, q, k, v, g, s0, resets):
  h = v.shape[2]
  return recurrence_reference(heads_from_groups(q, h), heads_from_groups(k, h), v, g, scale=config.scale,
                              initial_state=s0, resets=resets)


def _reference_backward(config, q, k, v, g, s0, resets, do, ds):
  forward = lambda q, k, v, g, s0: recurrence_reference(q, k, v, g, scale=config.scale, initial_state=s0,
                                                         resets=resets)
  q, k = heads_from_groups(q, v.shape[2]), heads_from_groups(k, v.shape[2])
  _, vjp = jax.vjp(forward, q, k, v, g.astype(jnp.float32), s0)
  dq, dk, dv, _, ds0 = vjp((do, ds))
  return dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32), ds0


def _per_platform(kernel_fn, reference_fn, config, *args):
  if config.backend is not None:
    return kernel_fn(config.backend, config, *args)
  return lax.platform_dependent(
      *args,
      tpu=functools.partial(kernel_fn, "tpu", config),
      cuda=functools.partial(kernel_fn, "gpu", config),
      default=functools.partial(reference_fn, config))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recurrence(config, q, k, v, g, s0, resets):
  return _per_platform(_kernel_forward, _reference_forward, config, q, k, v, g, s0, resets)


def _recurrence_fwd(config, q, k, v, g, s0, resets):
  o, st = _recurrence(config, q, k, v, g, s0, resets)
  return (o, st), (q, k, v, g, s0, resets, st)


def _recurrence_bwd(config, res, cotangents):
  q, k, v, g, s0, resets, st = res
  do, ds = cotangents
  ds = ds.astype(jnp.float32)
  dq, dk, dv, ds0 = _per_platform(_kernel_backward, _reference_backward, config, q, k, v, g, s0,
                                  resets, do, ds)
  f32 = lambda x: x.astype(jnp.float32)
  dc = f32(heads_from_groups(q, v.shape[2])) * dq - f32(heads_from_groups(k, v.shape[2])) * dk
  # The final state's rows scale with exp(c_T): their share lands on the last token.
  dc = dc.at[:, -1].add(jnp.sum(st * ds, axis=-1))
  if g.ndim == 3:
    dc = dc.sum(-1)
  dg = jnp.flip(jnp.cumsum(jnp.flip(dc, 1), axis=1), 1)
  d_resets = None if resets is None else jnp.zeros_like(resets)
  by_group = lambda d: d.reshape(d.shape[:2] + (q.shape[2], config.group, d.shape[-1])).sum(3)
  dq, dk = by_group(dq), by_group(dk)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype), ds0, d_resets)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
