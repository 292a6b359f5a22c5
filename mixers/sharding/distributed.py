"""Multi-host start-up and per-host data slicing.

A TPU pod, SLURM or MPI job describes itself through its own variables and `jax.distributed.initialize()` finds
its arguments there. A launcher of plain processes (`tpu_scripts/local.sh`: several processes on one machine)
names them explicitly:

  MIXERS_COORDINATOR          host:port of the coordination service (run by process 0)
  MIXERS_NUM_PROCESSES        processes in the job
  MIXERS_PROCESS_ID           this process, 0 .. MIXERS_NUM_PROCESSES - 1
  MIXERS_HEARTBEAT_TIMEOUT    seconds without a heartbeat before the job counts a process as dead and stops
                              (jax's default: 100)
  MIXERS_SHUTDOWN_TIMEOUT     seconds the processes wait for each other at exit (jax's default: 300)
"""
from __future__ import annotations

import os

import jax
import numpy as np

COORDINATOR = "MIXERS_COORDINATOR"
NUM_PROCESSES = "MIXERS_NUM_PROCESSES"
PROCESS_ID = "MIXERS_PROCESS_ID"
HEARTBEAT_TIMEOUT = "MIXERS_HEARTBEAT_TIMEOUT"
SHUTDOWN_TIMEOUT = "MIXERS_SHUTDOWN_TIMEOUT"

# Variables set by launchers of multi-process jobs; any of them with more than one process
# means `jax.distributed.initialize()` must run before the first use of a device.
_MULTI_HOST_HINTS = (
    COORDINATOR,                     # tpu_scripts/local.sh (and any launcher of plain processes)
    "TPU_WORKER_HOSTNAMES",          # Cloud TPU VM pod slices: comma-separated worker list
    "MEGASCALE_COORDINATOR_ADDRESS",  # multi-slice TPU
    "JAX_COORDINATOR_ADDRESS",       # explicit coordinator
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
)


def is_multi_host_platform(environ=None) -> bool:
  """True when the environment describes a job of several processes (TPU pod, SLURM, MPI, MIXERS_*)."""
  env = os.environ if environ is None else environ
  if env.get(COORDINATOR):
    return True
  workers = env.get("TPU_WORKER_HOSTNAMES", "")
  if len([w for w in workers.split(",") if w.strip()]) > 1:
    return True
  if env.get("MEGASCALE_COORDINATOR_ADDRESS") or env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  for count in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if env.get(count, "1").isdigit() and int(env.get(count, "1")) > 1:
      return True
  return False


def _int_variable(env, name):
  value = env.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r}: expected an integer") from None


def launcher_arguments(environ=None) -> dict:
  """Keyword arguments of `jax.distributed.initialize` given by the MIXERS_* variables ({} when unset).

  ValueError when MIXERS_COORDINATOR is set without MIXERS_NUM_PROCESSES and MIXERS_PROCESS_ID, or a value is bad.
  """
  env = os.environ if environ is None else environ
  kwargs = {}
  for name, key in ((HEARTBEAT_TIMEOUT, "heartbeat_timeout_seconds"), (SHUTDOWN_TIMEOUT, "shutdown_timeout_seconds")):
    value = _int_variable(env, name)
    if value is not None:
      if value < 1:
        raise ValueError(f"{name}={value}: expected >= 1 second")
      kwargs[key] = value
  if not env.get(COORDINATOR):
    return kwargs
  count, index = _int_variable(env, NUM_PROCESSES), _int_variable(env, PROCESS_ID)
  if count is None or index is None:
    raise ValueError(f"{COORDINATOR}={env[COORDINATOR]!r} needs {NUM_PROCESSES} and {PROCESS_ID} too")
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"{PROCESS_ID}={index}, {NUM_PROCESSES}={count}: expected 0 <= {PROCESS_ID} < "
                     f"{NUM_PROCESSES}")
  return {"coordinator_address": env[COORDINATOR], "num_processes": count, "process_id": index, **kwargs}


def maybe_initialize_distributed(environ=None, **kwargs) -> bool:
  """Calls `jax.distributed.initialize(**kwargs)` on multi-host platforms only; returns whether it did.

  The MIXERS_* variables (module docstring) supply the arguments not given in `kwargs`. Call first thing in a
  program (before any device is touched); single-host runs are untouched.
  """
  if not is_multi_host_platform(environ):
    return False
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(**{**launcher_arguments(environ), **kwargs})
  return True


def host_batch_slice(global_batch_size: int) -> slice:
  """The rows of a global batch this host reads when hosts split it evenly, in process order."""
  count, index = jax.process_count(), jax.process_index()
  if global_batch_size % count:
    raise ValueError(f"global_batch_size={global_batch_size} must be divisible by the {count} hosts")
  per_host = global_batch_size // count
  return slice(index * per_host, (index + 1) * per_host)


def _rows(index, size):
  """(start, stop) of a device's index along the batch axis."""
  start, stop, _ = index[0].indices(size)
  return start, stop


def host_data_shard(sharding, global_batch_size: int, process_index: int | None = None) -> tuple[int, int]:
  """(shard, num_shards): the rows of every global batch that `process_index` (default: this process) reads.

  A batch laid out by `sharding` (leading axis = the global batch) is cut into num_shards equal blocks of rows;
  this process's devices hold block `shard`. Processes whose devices hold the same rows read the same block:
  with the mesh's batch axes across processes each reads its own rows; with another axis (e.g. `sequence`)
  across them, each reads the whole batch. ValueError when a process's devices hold rows that are not one
  contiguous block of that kind.
  """
  process_index = jax.process_index() if process_index is None else process_index
  rows = {}
  for device, index in sharding.devices_indices_map((global_batch_size,)).items():
    rows.setdefault(device.process_index, set()).add(_rows(index, global_batch_size))
  spans = {p: (min(a for a, _ in r), max(b for _, b in r)) for p, r in rows.items()}
  start, stop = spans[process_index]
  width = stop - start
  covered = set().union(*(range(a, b) for a, b in rows[process_index]))
  if width == 0 or global_batch_size % width or start % width or len(covered) != width:
    raise ValueError(f"process {process_index} holds rows {sorted(rows[process_index])} of a batch of "
                     f"{global_batch_size} laid out by {sharding}: expected one contiguous block of "
                     "batch_size / k rows; order the mesh so that each process holds such a block")
  return start // width, global_batch_size // width


def global_batch(local_batch, sharding, global_batch_size: int | None = None):
  """Assembles each host's rows into global `jax.Array`s laid out by `sharding`.

  global_batch_size: the leading size of the global arrays (default: each host's rows stacked in process order,
  which holds when the hosts split the batch evenly along the mesh's batch axes).
  """
  def make(x):
    x = np.asarray(x)
    shape = None if global_batch_size is None else (global_batch_size,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)
  return jax.tree.map(make, local_batch)
