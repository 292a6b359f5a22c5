"""AdamW with linear warmup, cosine decay, global-norm clipping and optional gradient accumulation.

Fields of `config.optimizer`: learning_rate, warmup_steps, min_lr_ratio (final lr / peak lr), b1, b2,
eps, weight_decay (applied to matrices only, not to biases, norms or scalars), clip_norm (0: none),
accumulate_steps (k > 1: parameters change every k train steps, from the mean of k gradients).
"""
import jax
import ml_collections
import optax


def default_config():
  """The optimizer fields at their defaults (a fresh ConfigDict)."""
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=100, min_lr_ratio=0.1, b1=0.9, b2=0.98, eps=1e-8,
      weight_decay=0.1, clip_norm=1.0, accumulate_steps=1))


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


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config, num_steps):
  """The optax transformation of `config` (checked by `experiments.trainer.config`) for `num_steps` train steps."""
  parts = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm > 0 else []
  parts.append(optax.adamw(learning_rate_schedule(config, num_steps), b1=config.b1, b2=config.b2,
                           eps=config.eps, weight_decay=config.weight_decay, mask=_decay_mask))
  tx = optax.chain(*parts)
  if config.accumulate_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.accumulate_steps).gradient_transformation()
  return tx
