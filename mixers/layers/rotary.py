"""Rotary position embedding: rotate feature pairs (i, i + D/2) by angle pos * base^(-2i/D)."""
import jax.numpy as jnp


def apply_rotary(x, positions, base=10000.0):
  """x `[B,T,H,D]` (D even), positions `[B,T]` -> x rotated; q.k then depends on the position offset only."""
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"rotary embedding needs an even head dimension, got x of shape {x.shape}")
  freqs = base ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2 / d)
  angle = positions.astype(jnp.float32)[..., None, None] * freqs  # [B,T,1,D/2]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
