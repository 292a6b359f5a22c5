"""Logical-axis rules and the shardings they give parameters, optimizer state and batches.

Layers name their dimensions logically (`batch`, `length`, `embed`, `heads`, `kv`, `mlp`, `vocab`,
`conv`, `norm`, and `layers`: the stacked axis of scanned layers); a rule list maps each name onto mesh
axes. Rules are tried in order and a mesh axis is used at most once per array, so `embed -> fsdp`
applies to parameters while activations, whose `batch` already took `fsdp`, keep `embed` replicated.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, Any]]

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("norm", "fsdp"),
    ("kv", None),
    ("conv", None),
    ("layers", None),  # the stacked axis of scanned layers (nn.scan's metadata_params): replicated
)


def with_rules(rules: Rules = DEFAULT_RULES):
  """Context in which `nn.with_logical_constraint` and logical partitioning use `rules`."""
  return nn.logical_axis_rules(tuple(rules))


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Maps a tree of logical `PartitionSpec`s (or tuples of names) to `NamedSharding`s on `mesh`."""
  def to_spec(spec):
    return spec if isinstance(spec, PartitionSpec) else PartitionSpec(*spec)
  is_spec = lambda x: isinstance(x, (PartitionSpec, tuple))
  specs = jax.tree.map(to_spec, logical_specs, is_leaf=is_spec)
  return nn.logical_to_mesh_sharding(specs, mesh, tuple(rules))


def param_shardings(params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """`NamedSharding` per leaf of a parameter tree whose leaves may be `nn.LogicallyPartitioned`.

  Works on concrete or abstract (`jax.eval_shape`) trees; the result has the unboxed structure.
  Leaves without logical names are replicated.
  """
  return logical_to_sharding(nn.get_partition_spec(params), mesh, rules)


def shard_params(params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Unboxes `params` and places each leaf on `mesh` as its logical names say."""
  shardings = param_shardings(params, mesh, rules)
  return jax.device_put(nn.unbox(params), shardings)


def init_sharded(init_fn, *args, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Runs `init_fn(*args)` (e.g. `model.init`) under jit so every leaf is created already sharded.

  Returns `(unboxed variables, their shardings)`; nothing is materialised whole on one device.
  """
  with with_rules(rules):
    abstract = jax.eval_shape(init_fn, *args)
  shardings = param_shardings(abstract, mesh, rules)

  def init_unboxed(*a):
    with with_rules(rules):
      return nn.unbox(init_fn(*a))

  return jax.jit(init_unboxed, out_shardings=shardings)(*args), shardings


def like_params_shardings(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree (e.g. optimizer state) holding copies of the parameter tree.

  Every subtree with the parameters' structure (Adam's `mu`, `nu`, ...) takes the parameters'
  shardings where the leaf shapes agree; everything else (step counts, scalars) is replicated.
  `tree` may be abstract (`jax.eval_shape(tx.init, params)`).
  """
  params_def = jax.tree.structure(params)
  replicated = NamedSharding(mesh, PartitionSpec())

  def same_layout(node):
    return jax.tree.structure(node) == params_def

  def assign(node):
    if not same_layout(node):
      return replicated
    leaves = jax.tree.leaves(node)
    if all(jax.numpy.shape(a) == jax.numpy.shape(b) for a, b in zip(leaves, jax.tree.leaves(params))):
      return shardings
    return jax.tree.map(lambda _: replicated, node)

  return jax.tree.map(assign, tree, is_leaf=same_layout)


def opt_state_shardings(tx, params: Any, shardings: Any, mesh: Mesh) -> Any:
  """Shardings of `tx.init(params)` (an optax transformation), following the parameters'."""
  abstract = jax.eval_shape(tx.init, params)
  return like_params_shardings(abstract, params, shardings, mesh)


def batch_sharding(mesh: Mesh, logical: Sequence[str | None] = ("batch",),
                   rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Sharding of input batches: leading dim over (data, fsdp); pass ("batch", "length") to also
  split tokens over `sequence` (trailing dims are replicated)."""
  return logical_to_sharding(PartitionSpec(*logical), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def mesh_axes_for(logical: str, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes (of size > 1) that the first rule for `logical` names."""
  for name, axes in rules:
    if name == logical:
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
  return ()


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """`jax.set_mesh(mesh)` together with the logical-axis rules."""
  with jax.set_mesh(mesh), with_rules(rules):
    yield mesh
