"""Multi-host start-up and per-host data slicing."""
from __future__ import annotations

import os

import jax

# Variables set by launchers of multi-process jobs; any of them with more than one process
# means `jax.distributed.initialize()` must run before the first use of a device.
_MULTI_HOST_HINTS = (
    "TPU_WORKER_HOSTNAMES",          # Cloud TPU VM pod slices: comma-separated worker list
    "MEGASCALE_COORDINATOR_ADDRESS",  # multi-slice TPU
    "JAX_COORDINATOR_ADDRESS",       # explicit coordinator
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
)


def is_multi_host_platform(environ=None) -> bool:
  """True when the environment describes a job of several processes (TPU pod, SLURM, MPI)."""
  env = os.environ if environ is None else environ
  workers = env.get("TPU_WORKER_HOSTNAMES", "")
  if len([w for w in workers.split(",") if w.strip()]) > 1:
    return True
  if env.get("MEGASCALE_COORDINATOR_ADDRESS") or env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  for count in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if env.get(count, "1").isdigit() and int(env.get(count, "1")) > 1:
      return True
  return False


def maybe_initialize_distributed(environ=None, **kwargs) -> bool:
  """Calls `jax.distributed.initialize(**kwargs)` on multi-host platforms only; returns whether it did.

  Call first thing in a program (before any device is touched); single-host runs are untouched.
  """
  if not is_multi_host_platform(environ):
    return False
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(**kwargs)
  return True


def host_batch_slice(global_batch_size: int) -> slice:
  """The rows of a global batch this host reads (hosts split it evenly, in process order)."""
  count, index = jax.process_count(), jax.process_index()
  if global_batch_size % count:
    raise ValueError(f"global_batch_size={global_batch_size} must be divisible by the {count} hosts")
  per_host = global_batch_size // count
  return slice(index * per_host, (index + 1) * per_host)


def global_batch(local_batch, sharding):
  """Assembles each host's rows into global `jax.Array`s laid out by `sharding`."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
