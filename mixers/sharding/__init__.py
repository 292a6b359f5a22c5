"""Meshes, logical-axis sharding, sequence parallelism and multi-host start-up.

  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  variables, shardings = init_sharded(model.init, rng, x, mesh=mesh)
  step = jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=...)
  la = sequence_parallel(mixers.ops.linear_attention, mesh)   # [B,T,...] split along T
"""
from mixers.sharding.distributed import (global_batch, host_batch_slice, host_data_shard, is_multi_host_platform,
                                         launcher_arguments, maybe_initialize_distributed)
from mixers.sharding.mesh import MESH_AXES, make_mesh, mesh_shape
from mixers.sharding.rules import (DEFAULT_RULES, batch_sharding, init_sharded, like_params_shardings,
                                   logical_to_sharding, mesh_axes_for, opt_state_shardings, param_shardings,
                                   replicated, shard_params, use_mesh, with_rules)
from mixers.sharding.sequence_parallel import active_sequence_mesh, sequence_parallel, supported_ops

__all__ = [
    "MESH_AXES", "DEFAULT_RULES", "make_mesh", "mesh_shape", "with_rules", "use_mesh", "logical_to_sharding",
    "param_shardings", "shard_params", "init_sharded", "like_params_shardings", "opt_state_shardings",
    "batch_sharding", "replicated", "mesh_axes_for", "sequence_parallel", "active_sequence_mesh", "supported_ops",
    "maybe_initialize_distributed", "is_multi_host_platform", "launcher_arguments", "host_batch_slice",
    "host_data_shard", "global_batch",
]
