"""Shape checks and dtype rules shared by the forms of the gated linear recurrence."""
import jax.numpy as jnp

from mixers.ops import checks


def compute_dtype(*xs):
  """float32 accumulation whatever the inputs (float64 stays float64)."""
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def output_dtype(*xs):
  return jnp.result_type(*xs)


def heads_from_groups(a, heads):
  """[B,T,G,N] -> [B,T,H,N]: head h reads group h // (H // G) (materialised broadcast)."""
  g = a.shape[2]
  return a if g == heads else jnp.repeat(a, heads // g, axis=2)


def check_qkv(q, k, v, *, cross=False):
  """q, k `[B,T,H,K]`, v `[B,T,H,V]`; with `cross`, k `[B,Tk,H,K]` and v `[B,Tk,H,V]` of their own length Tk."""
  checks.check_float(q=q, k=k, v=v)
  checks.check_rank("q", q, 4, "[B,T,H,K]")
  if cross:
    b, _, h, dk = q.shape
    checks.check_shape("k", k, (b, None, h, dk), f"[B,Tk,H,K] with (B, H, K) = {(b, h, dk)} like q")
    checks.check_shape("v", v, k.shape[:3] + (None,), f"[B,Tk,H,V] = {tuple(k.shape[:3])} + (V,) like k")
    return
  checks.check_shape("k", k, q.shape, f"{tuple(q.shape)} like q [B,T,H,K]")
  checks.check_shape("v", v, q.shape[:3] + (None,), f"[B,T,H,V] = {tuple(q.shape[:3])} + (V,)")


def normalize_log_decay(log_decay, q, name="log_decay"):
  """None | [H] | [B,T,H] | [B,T,H,K] -> None | [B,T,H] | [B,T,H,K] (float)."""
  if log_decay is None:
    return None
  b, t, h, k = q.shape
  log_decay = jnp.asarray(log_decay)
  if log_decay.shape == (h,):
    log_decay = jnp.broadcast_to(log_decay, (b, t, h))
  elif log_decay.shape not in ((b, t, h), (b, t, h, k)):
    raise ValueError(f"{name} must have shape None, [H]=({h},), [B,T,H]={(b, t, h)} or [B,T,H,K]={(b, t, h, k)}, "
                     f"got {tuple(log_decay.shape)}")
  if not jnp.issubdtype(log_decay.dtype, jnp.floating):
    log_decay = log_decay.astype(jnp.float32)
  return checks.nonpositive_or_nan(name, log_decay)


def check_state(name, state, q, v):
  if state is None:
    return
  b, _, h, k = q.shape
  checks.check_shape(name, state, (b, h, k, v.shape[-1]), f"[B,H,K,V] = {(b, h, k, v.shape[-1])}")
