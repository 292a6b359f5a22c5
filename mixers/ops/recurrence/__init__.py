"""The gated linear recurrence, the one core most mixers here are instances of.

  S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = scale * q_t^T S_t

q, k `[B,T,H,K]`, v `[B,T,H,V]`, g (log-decay, <= 0) None | `[H]` | `[B,T,H]` | `[B,T,H,K]`, states
`[B,H,K,V]` accumulated in float32. With `exclusive=True` a token reads the state before its own write:
o_t = scale * q_t^T diag(exp(g_t)) S_{t-1}. `resets` (bool `[B,T]`, packed sequences) restarts the recurrence:
at a reset token S_{t-1} is replaced by zeros, so each segment runs as its own sequence (S_0 reaches the first
segment only; the final state is the last segment's). Forms (`impl`): "reference" (materialised T x T matrix),
"recurrent" (token loop), "chunked" (sub-quadratic pure JAX), "pallas" (the kernels through `kernel_path`: any T,
exclusive, mixed dtypes); "auto" picks, per platform when the program is lowered, the kernel where one takes the
inputs, else chunked (kernels offered for the platforms with local devices, others with `lower_kernels_for`).
Invalid decays (g > 0) raise when concrete and become NaN under jit (`checks.nonpositive_or_nan`); a chunked form's
NaN also reaches the earlier outputs of its chunk.
"""
import contextlib
import functools
import threading

import jax

from mixers.ops import checks
from mixers.ops.recurrence import chunked, kernel_path, recurrent, reference, shapes
from mixers.ops.recurrence.reference import mixing_matrix
from mixers.ops.recurrence.recurrent import step

IMPLS = ("auto", "chunked", "recurrent", "reference", "pallas")


# (platform as `lax.platform_dependent` names it, kernel backend)
_KERNEL_PLATFORMS = (("tpu", "tpu"), ("cuda", "gpu"))
_offered = threading.local()


@functools.lru_cache(maxsize=None)
def _platforms_with_devices():
  """The kernel platforms this process has devices for."""
  found = []
  for platform, backend in _KERNEL_PLATFORMS:
    try:
      jax.devices(backend)
      found.append(platform)
    except RuntimeError:
      pass
  return tuple(found)


@functools.lru_cache(maxsize=None)
def _local_tpu_kind():
  try:
    return jax.devices("tpu")[0].device_kind
  except RuntimeError:
    return None


@contextlib.contextmanager
def lower_kernels_for(*platforms, tpu_kind=None):
  """Within the block, `impl="auto"` also offers the kernels of `platforms` ("cuda", "tpu") to programs traced here,
  for exporting or compiling them for a platform this process has no device of (`jax.export` from a CPU host).
  Outside it only the platforms with local devices are offered: a kernel branch is traced even where it is not
  lowered, and its custom VJP has no forward mode (`jax.jvp`, `jax.jacfwd`). tpu_kind: the target TPU's
  `device_kind` ("TPU v6 lite"), which sets the TPU kernel's chunk (`kernel_chunk_size`; default: the local TPU's,
  else v5's)."""
  unknown = [p for p in platforms if p not in dict(_KERNEL_PLATFORMS)]
  if unknown:
    raise ValueError(f"platforms must be among {[p for p, _ in _KERNEL_PLATFORMS]}, got {unknown}")
  previous = getattr(_offered, "platforms", ()), getattr(_offered, "tpu_kind", None)
  _offered.platforms = previous[0] + tuple(platforms)
  _offered.tpu_kind = tpu_kind or previous[1]
  try:
    yield
  finally:
    _offered.platforms, _offered.tpu_kind = previous


def kernel_chunk_size(platform, t, chunk_size):
  """The chunk `impl="auto"` runs `platform`'s kernel in for T = t: chunk_size on cuda; on tpu, wider up to the TPU
  generation's MXU width (128 to v5, 256 from v6e; `chunk_tpu.preferred_chunk`), for the target set by
  `lower_kernels_for(tpu_kind=...)`, else the local TPU. The chunk changes the work's blocking, not the result."""
  if platform != "tpu":
    return chunk_size
  from mixers.kernels import chunk_tpu  # pylint: disable=import-outside-toplevel
  return chunk_tpu.preferred_chunk(t, chunk_size, getattr(_offered, "tpu_kind", None) or _local_tpu_kind())


def kernel_supported(q, k, v, log_decay, chunk_size, backend):
  """Whether the `backend` ("tpu" | "gpu") kernel takes these inputs once `kernel_path` has padded T to the chunk and
  cast v to q and k's dtype."""
  from mixers import kernels  # pylint: disable=import-outside-toplevel
  if q.shape[1] == 0:
    return False
  t = kernel_path.padded_length(q.shape[1], chunk_size)
  dtype = kernel_path.kernel_dtype(q, k)
  like = lambda x, d: jax.ShapeDtypeStruct((x.shape[0], t) + tuple(x.shape[2:]), d)
  g = None if log_decay is None else like(log_decay, log_decay.dtype)
  return kernels.supports(like(q, dtype), like(k, dtype), like(v, dtype), g, chunk_size, backend)


def select_at_lowering(args, default, kernel, like, chunk_size, *, retile=True):
  """default(*args), or kernel(*args, chunk_size=c) where the program is lowered for a platform offered here (local
  devices, `lower_kernels_for`) whose kernel takes `like` = (q, k, v, log_decay) (arrays or `jax.ShapeDtypeStruct`s)
  in chunks of c: the platform's `kernel_chunk_size` with `retile`, else chunk_size. The choice is made when
  lowering (`lax.platform_dependent`), so a program compiled or exported for a GPU or TPU from any host runs the
  kernel there. default and kernel must return the same shapes and dtypes."""
  offered = set(_platforms_with_devices()) | set(getattr(_offered, "platforms", ()))
  branches = {}
  for platform, backend in _KERNEL_PLATFORMS:
    if platform not in offered:
      continue
    chunk = kernel_chunk_size(platform, like[0].shape[1], chunk_size) if retile else chunk_size
    if kernel_supported(*like, chunk, backend):
      branches[platform] = functools.partial(kernel, chunk_size=chunk)
  if not branches:
    return default(*args)
  return jax.lax.platform_dependent(*args, default=default, **branches)


def _kernel(q, k, v, log_decay, **kw):
  o, state = kernel_path.recurrence(q, k, v, log_decay, **kw)
  return o, state.astype(shapes.compute_dtype(q, k, v))  # the chunked form's dtype


def gated_linear_recurrence(q, k, v, log_decay=None, *, scale=1.0, initial_state=None, exclusive=False,
                            chunk_size=64, impl="auto", resets=None):
  """Returns (o `[B,T,H,V]` in the inputs' dtype, final state `[B,H,K,V]` in float32 or wider)."""
  checks.check_choice("impl", impl, IMPLS)
  if resets is not None:
    checks.check_shape("resets", resets, q.shape[:2], f"bool [B,T] = {tuple(q.shape[:2])}")
    if q.shape[1] == 0:
      resets = None
  checks.check_positive_int("chunk_size", chunk_size)
  shapes.check_qkv(q, k, v)
  log_decay = shapes.normalize_log_decay(log_decay, q)
  shapes.check_state("initial_state", initial_state, q, v)
  if log_decay is not None:
    # Decays are often constants (fixed per-head rates); keep XLA from constant-folding their cumsums.
    log_decay = jax.lax.optimization_barrier(log_decay)
  kw = dict(scale=scale, initial_state=initial_state, exclusive=exclusive, resets=resets)
  if impl == "auto":
    args = (q, k, v, log_decay)
    return select_at_lowering(args, functools.partial(chunked.recurrence, chunk_size=chunk_size, **kw),
                              functools.partial(_kernel, **kw), args, chunk_size)
  if impl == "reference":
    return reference.recurrence(q, k, v, log_decay, **kw)
  if impl == "recurrent":
    return recurrent.recurrence(q, k, v, log_decay, **kw)
  if impl == "pallas":
    return kernel_path.recurrence(q, k, v, log_decay, chunk_size=chunk_size, **kw)
  return chunked.recurrence(q, k, v, log_decay, chunk_size=chunk_size, **kw)


__all__ = ["gated_linear_recurrence", "mixing_matrix", "step", "IMPLS", "kernel_chunk_size", "lower_kernels_for",
           "select_at_lowering"]
