"""Losses, metrics and the jitted, sharded train and eval steps for language models and classifiers.

The train state is a dict `{"step": int32 [], "params": ..., "opt_state": ...}` (parameters float32;
the model's `dtype` sets the compute dtype). Metrics come back as sums over the batch so that they
add up across steps and hosts: `loss_sum`, `correct`, `count` (scored tokens or valid examples),
plus `grad_norm` (before clipping) and `param_norm` (after the update) for training.
"""
import jax
import jax.numpy as jnp
import optax

from experiments.data.targets import IGNORE_INDEX
from mixers import sharding

TASKS = ("lm", "classification")


def model_inputs(batch):
  """(positional input, kwargs) of the model for a batch: tokens with their mask (and segment ids when packed),
  or an image."""
  if "image" in batch:
    return batch["image"], {}
  kwargs = {"mask": batch["mask"]}
  if "segment_ids" in batch:
    kwargs["segment_ids"] = batch["segment_ids"]
  return batch["inputs"], kwargs


def lm_metrics(logits, targets):
  """logits [B,T,V] float32, targets [B,T] int (IGNORE_INDEX: not scored) -> sums over scored tokens."""
  scored = targets != IGNORE_INDEX
  safe = jnp.where(scored, targets, 0)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  correct = (jnp.argmax(logits, -1) == safe) & scored
  return {"loss_sum": jnp.sum(jnp.where(scored, loss, 0.0)), "correct": jnp.sum(correct).astype(jnp.float32),
          "count": jnp.sum(scored).astype(jnp.float32)}


def classification_metrics(logits, labels, valid):
  """logits [B,C] float32, labels [B] int, valid [B] bool -> sums over valid examples."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels) & valid
  return {"loss_sum": jnp.sum(jnp.where(valid, loss, 0.0)), "correct": jnp.sum(correct).astype(jnp.float32),
          "count": jnp.sum(valid).astype(jnp.float32)}


def batch_metrics(model, params, batch, task):
  """Metric sums of `model` with `params` on `batch` for task "lm" or "classification"."""
  x, kwargs = model_inputs(batch)
  logits = model.apply({"params": params}, x, **kwargs)
  if task == "lm":
    targets = jnp.where(batch["valid"][:, None], batch["targets"], IGNORE_INDEX)
    return lm_metrics(logits, targets)
  return classification_metrics(logits, batch["label"], batch["valid"])


def mean_loss(metrics):
  return metrics["loss_sum"] / jnp.maximum(metrics["count"], 1.0)


def init_train_state(model, optimizer, mesh, rng, example_batch, *, rules=sharding.DEFAULT_RULES):
  """(state, state shardings): parameters initialised already sharded on `mesh`, optimizer state beside them."""
  x, kwargs = model_inputs(example_batch)
  x = jnp.asarray(x)
  kwargs = {k: jnp.asarray(v) for k, v in kwargs.items()}
  init = lambda r, inp: model.init(r, inp, **kwargs)
  variables, var_shardings = sharding.init_sharded(init, rng, x, mesh=mesh, rules=rules)
  params, param_sh = variables["params"], var_shardings["params"]
  opt_sh = sharding.opt_state_shardings(optimizer, params, param_sh, mesh)
  opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
  replicated = sharding.replicated(mesh)
  state = {"step": jax.device_put(jnp.zeros((), jnp.int32), replicated), "params": params, "opt_state": opt_state}
  return state, {"step": replicated, "params": param_sh, "opt_state": opt_sh}


def _in_mesh(fn, mesh, rules):
  def wrapped(*args):
    with sharding.use_mesh(mesh, rules):
      return fn(*args)
  return wrapped


def make_train_step(model, optimizer, mesh, state_shardings, *, task="lm", rules=sharding.DEFAULT_RULES):
  """Jitted `(state, batch) -> (state, metrics)` with explicit in/out shardings on `mesh`; donates `state`.

  batch: dict of arrays with the global batch as leading axis, split over (data, fsdp).
  metrics: replicated scalars (see the module docstring).
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r}: expected one of {TASKS}")

  def train_step(state, batch):
    def loss_fn(params):
      metrics = batch_metrics(model, params, batch, task)
      return mean_loss(metrics), metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  replicated = sharding.replicated(mesh)
  jitted = jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh, rules=rules)),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  return _in_mesh(jitted, mesh, rules)


def make_eval_step(model, mesh, param_shardings, *, task="lm", rules=sharding.DEFAULT_RULES):
  """Jitted `(params, batch) -> metric sums` (replicated scalars); padding rows (valid=False) count for nothing."""
  if task not in TASKS:
    raise ValueError(f"task={task!r}: expected one of {TASKS}")
  fn = lambda params, batch: batch_metrics(model, params, batch, task)
  jitted = jax.jit(fn, in_shardings=(param_shardings, sharding.batch_sharding(mesh, rules=rules)),
                   out_shardings=sharding.replicated(mesh))
  return _in_mesh(jitted, mesh, rules)

