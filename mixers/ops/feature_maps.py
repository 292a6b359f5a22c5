"""Feature maps phi for linear attention: softmax(q k^T) is replaced by phi(q) phi(k)^T. x is `[..., D]`."""
import math

import jax
import jax.numpy as jnp


def identity(x):
  return x


def elu_plus_one(x):
  """phi(x) = elu(x) + 1 > 0 (Katharopoulos et al., 2020)."""
  return jax.nn.elu(x) + 1


def relu(x):
  return jax.nn.relu(x)


def taylor_exp(x):
  """2nd-order Taylor map (Based): phi(q) . phi(k) = 1 + q.k + (q.k)^2 / 2; `[..., D]` -> `[..., 1 + D + D^2]`."""
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], -1) / math.sqrt(2.0)
  return jnp.concatenate([jnp.ones_like(x[..., :1]), x, outer], axis=-1)


def cosformer(x, positions, max_len):
  """cosFormer reweighting: relu(x) [cos, sin](pi t / 2M), so phi(q_t).phi(k_s) = relu(q).relu(k) cos(pi (t-s) / 2M).

  x `[B,T,H,D]`, positions `[T]` or `[B,T]` (token index t), max_len M >= every position; -> `[B,T,H,2D]`.
  """
  angle = (jnp.pi / 2) * jnp.asarray(positions, jnp.float32) / max_len
  angle = jnp.broadcast_to(angle, x.shape[:2])[..., None, None]
  r = jax.nn.relu(x)
  return jnp.concatenate([r * jnp.cos(angle).astype(x.dtype), r * jnp.sin(angle).astype(x.dtype)], axis=-1)


def hedgehog(x, weight):
  """Hedgehog learnable map: [softmax(x W), softmax(-x W)] over features; weight `[H, D, F]` -> `[..., H, 2F]`."""
  z = jnp.einsum("...hd,hdf->...hf", x, weight)
  return jnp.concatenate([jax.nn.softmax(z, axis=-1), jax.nn.softmax(-z, axis=-1)], axis=-1)


FEATURE_MAPS = {"identity": identity, "elu": elu_plus_one, "relu": relu, "taylor": taylor_exp}


def get(name):
  """Parameter-free feature map by name; cosformer and hedgehog take extra arguments and are called directly."""
  if name not in FEATURE_MAPS:
    raise ValueError(f"unknown feature map {name!r}; valid names: {', '.join(sorted(FEATURE_MAPS))} "
                     "(plus 'cosformer' and 'hedgehog' in the LinearAttention layer)")
  return FEATURE_MAPS[name]
