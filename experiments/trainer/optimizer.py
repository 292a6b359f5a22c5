"""AdamW with linear warmup, cosine decay, global-norm clipping, per-parameter multipliers and gradient accumulation.

Fields of `config.optimizer`: learning_rate, warmup_steps, min_lr_ratio (final lr / peak lr), b1, b2,
eps, weight_decay (applied to matrices only, not to biases, norms or scalars), clip_norm (0: none),
accumulate_steps (k > 1: parameters change every k train steps, from the mean of k gradients),
lr_mults and wd_mults: ((regex, multiplier), ...) over parameter paths such as
`params/layers_0/mixer/filter/dense_0/kernel`; the first pattern that `re.search`es a path sets that parameter's
learning-rate multiplier (default 1) or weight-decay multiplier (default 1 on matrices, 0 elsewhere), e.g.
`lr_mults=(("filter", 0.1),)` trains M2's implicit filters 10x slower. A pattern that matches no parameter is an
error. The update of a parameter p with multipliers (a, w) is `-lr(step) * a * (adam(g) + weight_decay * w * p)`.
"""
import re

import jax
import ml_collections
import optax


def default_config():
  """The optimizer fields at their defaults (a fresh ConfigDict)."""
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=100, min_lr_ratio=0.1, b1=0.9, b2=0.98, eps=1e-8,
      weight_decay=0.1, clip_norm=1.0, accumulate_steps=1, lr_mults=(), wd_mults=()))


def num_updates(config, num_steps):
  """Parameter updates in a run of `num_steps` train steps (batches)."""
  return max(num_steps // max(config.accumulate_steps, 1), 1)


def learning_rate_schedule(config, num_steps):
  """update -> lr: 0 -> peak over warmup_steps, then cosine down to min_lr_ratio * peak at the last update."""
  total = num_updates(config, num_steps)
  warmup = min(config.warmup_steps, max(total - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else config.learning_rate, peak_value=config.learning_rate,
      warmup_steps=warmup, decay_steps=max(total, warmup + 1),
      end_value=config.learning_rate * config.min_lr_ratio)


def check_mults(name, mults):
  """`mults` as a tuple of (compiled regex, float); ValueError naming `config.optimizer.<name>` otherwise."""
  out = []
  for item in mults or ():
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], (int, float)) and not isinstance(item[1], bool) and item[1] >= 0):
      raise ValueError(f"config.optimizer.{name}: expected ((regex, multiplier >= 0), ...), got item {item!r}")
    try:
      out.append((re.compile(item[0]), float(item[1])))
    except re.error as e:
      raise ValueError(f"config.optimizer.{name}: bad regex {item[0]!r} ({e})") from None
  return tuple(out)


def param_path(path):
  """'params/layers_0/mixer/kernel' for a pytree key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def multipliers(params, mults, default, *, name):
  """A pytree like `params` of floats: the first matching pattern's multiplier, else default(param).

  ValueError naming `config.optimizer.<name>` when a pattern matches no parameter (a typo trains nothing slower)."""
  mults = check_mults(name, mults)
  paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for pattern, _ in mults:
    if not any(pattern.search(p) for p in paths):
      raise ValueError(f"config.optimizer.{name}: pattern {pattern.pattern!r} matches no parameter; "
                       f"parameters look like {paths[:3]}")

  def pick(path, p):
    path = param_path(path)
    return next((m for pattern, m in mults if pattern.search(path)), default(p))

  return jax.tree_util.tree_map_with_path(pick, params)


def scale_by_multipliers(make_mults):
  """Multiplies each update by its parameter's multiplier, `make_mults(updates)` (python floats, built at trace)."""
  def scale(updates, params):
    del params
    return jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, make_mults(updates))
  return optax.stateless(scale)


def add_decayed_weights(weight_decay, make_mults):
  """updates + weight_decay * multiplier * params (decoupled weight decay, per-parameter)."""
  def decay(updates, params):
    if params is None:
      raise ValueError("add_decayed_weights needs the parameters")
    return jax.tree.map(lambda u, p, m: u if m == 0.0 else u + (weight_decay * m) * p, updates, params,
                        make_mults(params))
  return optax.stateless(decay)


def make_optimizer(config, num_steps):
  """The optax transformation of `config` (checked by `experiments.trainer.config`) for `num_steps` train steps."""
  lr_mults = lambda tree: multipliers(tree, config.lr_mults, lambda p: 1.0, name="lr_mults")
  wd_mults = lambda tree: multipliers(tree, config.wd_mults, lambda p: float(p.ndim >= 2), name="wd_mults")
  parts = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm > 0 else []
  parts += [optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps)]
  if config.weight_decay > 0:
    parts.append(add_decayed_weights(config.weight_decay, wd_mults))
  parts += [optax.scale_by_learning_rate(learning_rate_schedule(config, num_steps))]
  if config.lr_mults:
    parts.append(scale_by_multipliers(lr_mults))
  tx = optax.chain(*parts)
  if config.accumulate_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.accumulate_steps).gradient_transformation()
  return tx
