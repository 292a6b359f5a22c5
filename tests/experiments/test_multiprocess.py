"""Multi-host training on one machine: `tpu_scripts/local.sh` runs the trainer as a job of 2 CPU processes with 2
devices each (jax.distributed, gloo collectives), the code path of a TPU pod.

Two module fixtures share the jobs between the assertions: one process with 4 devices (the reference, every
checkpoint kept), and one run of two processes in three jobs: the first is stopped by SIGTERM to process 1, the
rerun is killed (kill -9 of process 1), and the last rerun finishes on a (data=2, sequence=2) mesh whose sequence
axis spans the two processes (a checkpoint restores onto any mesh). Its checkpoint written before the kill holds the
data-parallel steps; its last one also the sequence-parallel steps. The model is a hybrid of a GLA layer and a
Mamba2 layer, so the sequence-parallel steps cover both mixers.
"""
import json
import os
import re
import signal
import subprocess
import time

import jax
import orbax.checkpoint as ocp
import pytest

from experiments.trainer import checkpoint
from mixers.sharding import distributed
from tests.conftest import rel_rms

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCAL = os.path.join(REPO, "tpu_scripts", "local.sh")
CONFIG = "configs/mqar.py:gla+mamba2,tiny"
NUM_STEPS = 16
EVERY = 4  # steps between checkpoints
LOG_EVERY = 2  # steps between train-metric rows
HEARTBEAT = 5  # seconds: a process silent that long counts as dead and the job stops
GRACE = 20  # seconds local.sh gives the other processes to stop before SIGKILL
FLAGS = {"data.vocab_size": 32, "data.seq_len": 16, "data.num_pairs": 2, "data.num_train": 64,
         "data.num_validation": 16, "data.num_test": 16, "model.d_model": 16, "model.num_layers": 2,
         "batch_size": 8, "eval_batch_size": 16, "num_steps": NUM_STEPS, "checkpoint_every": EVERY,
         "log_every": LOG_EVERY, "eval_every": 0, "keep_checkpoints": 20, "plot": False,
         "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 2}
SEQUENCE_PARALLEL = {"mesh.data": 2, "mesh.sequence": 2, "process_axis": "sequence"}
# Relative RMS difference of each parameter array between runs: the sums over devices and processes are taken in
# another order (gloo across processes, sequence slices), float32 rounding only.
TOLERANCE = 1e-5
TIMEOUT = 300  # seconds for one job


class Job:
  """One `local.sh` job in the background; its output (process 0's and local.sh's) goes to `self.log`."""

  started = 0

  def __init__(self, workdir, shared, *, processes=2, devices=2, **overrides):
    flags = {**FLAGS, "data.data_dir": shared["data"], **overrides}
    command = ["bash", LOCAL, "--num_processes", str(processes), "--devices_per_process", str(devices),
               "--heartbeat_timeout", str(HEARTBEAT), "--grace", str(GRACE), "--config", CONFIG,
               "--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in flags.items()]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=shared["cache"], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONUNBUFFERED="1")
    self.workdir = str(workdir)
    Job.started += 1
    self.log = f"{workdir}.job{Job.started}.out"
    self.start = time.time()
    with open(self.log, "w") as out:
      self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)

  def trainer_pid(self, index):
    """The pid of trainer process `index` (a child of local.sh whose MIXERS_PROCESS_ID is index), once started."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
      for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
          with open(f"/proc/{pid}/stat") as f:
            parent = int(f.read().rsplit(")", 1)[1].split()[1])
          if parent != self.proc.pid:
            continue
          with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
          continue
        if f"{distributed.PROCESS_ID}={index}".encode() in environ:
          return pid
      time.sleep(0.05)
    raise AssertionError(f"no trainer process {index} under local.sh (pid {self.proc.pid})")

  def wait_for_checkpoint(self, step):
    """Waits until checkpoint `step` is complete (its checksums written)."""
    path = os.path.join(self.workdir, "checkpoints", str(step), "SHA256SUMS")
    deadline = time.time() + TIMEOUT
    while not os.path.exists(path):
      ended = self.proc.poll()
      assert ended is None, f"the job ended ({ended}) before checkpoint {step}:\n{self.output()}"
      assert time.time() < deadline, f"no checkpoint {step} after {TIMEOUT} s:\n{self.output()}"
      time.sleep(0.05)

  def wait(self):
    """The job's exit status."""
    try:
      return self.proc.wait(timeout=TIMEOUT)
    finally:
      self.stop()
      print(f"{self.log}: {time.time() - self.start:.1f} s")

  def stop(self):
    if self.proc.poll() is None:
      os.killpg(self.proc.pid, signal.SIGKILL)
      self.proc.wait()

  def output(self):
    with open(self.log) as f:
      return f.read()


def saved_params(workdir, step):
  """The parameters of checkpoint `step` of `workdir` on this process's first device (the saving processes' devices
  are not here)."""
  ckpt = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), every=1)
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  try:
    saved = ckpt.manager.item_metadata(step)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), saved)
    return jax.device_get(ckpt.manager.restore(step, args=ocp.args.StandardRestore(target))["params"])
  finally:
    ckpt.close()


def max_difference(a, b):
  """The largest relative RMS difference between the arrays of two parameter trees of one structure."""
  return max(rel_rms(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def checkpoint_steps(workdir):
  return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


def finished(job):
  status = job.wait()
  assert status == 0, job.output()
  return job


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """A data_dir and a persistent compilation cache shared by every job of this module."""
  root = tmp_path_factory.mktemp("multiprocess")
  return {"data": str(root / "data"), "cache": str(root / "cache"), "root": root}


@pytest.fixture(scope="module")
def one_process(shared):
  """The reference: one process with 4 devices, the same global batch and seed."""
  return finished(Job(shared["root"] / "one_process", shared, processes=1, devices=4))


@pytest.fixture(scope="module")
def interrupted(shared):
  """Two processes: SIGTERM to process 1 after the first checkpoint; rerun, kill -9 of process 1 after the next
  checkpoint; rerun to the end on the sequence-parallel mesh, plots on. A dict of the jobs and what they did."""
  workdir = shared["root"] / "two_processes"
  run = {"workdir": str(workdir)}
  job = Job(workdir, shared)
  pid = job.trainer_pid(1)
  job.wait_for_checkpoint(EVERY)
  os.kill(pid, signal.SIGTERM)
  run["sigterm"] = finished(job)
  stopped = re.search(r"stopped at step (\d+) by SIGTERM", job.output())
  assert stopped, job.output()
  run["sigterm_step"] = step = int(stopped.group(1))
  assert EVERY < step < NUM_STEPS - EVERY, f"SIGTERM after checkpoint {EVERY} stopped the run at step {step}"

  job = Job(workdir, shared)
  pid = job.trainer_pid(1)
  run["before_kill"] = (step // EVERY + 1) * EVERY
  job.wait_for_checkpoint(run["before_kill"])
  os.kill(pid, signal.SIGKILL)
  start = time.time()
  run["killed"], run["kill_status"] = job, job.wait()
  run["kill_seconds"] = time.time() - start

  run["final"] = finished(Job(workdir, shared, plot=True, **SEQUENCE_PARALLEL))
  resumed = re.search(r"resumed from checkpoint step (\d+)", run["final"].output())
  assert resumed and int(resumed.group(1)) < NUM_STEPS, run["final"].output()
  return run


def test_sigterm_to_one_process_saves_one_checkpoint_for_the_group(interrupted):
  step = interrupted["sigterm_step"]
  assert step in checkpoint_steps(interrupted["workdir"])
  assert f"resumed from checkpoint step {step}" in interrupted["killed"].output()


def test_a_killed_process_stops_the_group_with_a_named_error(interrupted):
  output = interrupted["killed"].output()
  assert interrupted["kill_status"] == 128 + signal.SIGKILL, output
  assert f"process 1 exited with status {128 + signal.SIGKILL}" in output
  assert "JAX distributed service detected fatal errors" in output  # process 0's end, as jax names it
  assert interrupted["kill_seconds"] < HEARTBEAT + GRACE + 5, output


def test_two_processes_equal_one_through_sigterm_and_kill(interrupted, one_process):
  """The checkpoint saved before the kill: data-parallel steps only, hosts reading their halves of each batch."""
  step = interrupted["before_kill"]
  difference = max_difference(saved_params(interrupted["workdir"], step), saved_params(one_process.workdir, step))
  print(f"step {step}, 2 processes x 2 devices vs 1 x 4: largest relative RMS difference {difference:.2e}")
  assert difference <= TOLERANCE


def test_one_checkpoint_per_saved_step_and_one_metrics_row_per_logged_step(interrupted):
  workdir, step = interrupted["workdir"], interrupted["sigterm_step"]
  saved = checkpoint_steps(workdir)
  assert saved == sorted(set(range(EVERY, NUM_STEPS + 1, EVERY)) | {step})
  for s in saved:
    assert os.path.exists(os.path.join(workdir, "checkpoints", str(s), "SHA256SUMS"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train = [r["step"] for r in rows if "train/loss" in r]
  assert train == sorted(set(range(LOG_EVERY, NUM_STEPS + 1, LOG_EVERY)) | {step}), train
  assert [r["step"] for r in rows if "eval/loss" in r] == [NUM_STEPS]


def test_only_process_zero_writes_logs_and_plots(interrupted):
  workdir = interrupted["workdir"]
  assert os.listdir(os.path.join(workdir, "plots"))
  assert f"step={NUM_STEPS} validation" in interrupted["final"].output()
  with open(os.path.join(workdir, "process_1.log")) as f:
    assert "validation accuracy" not in f.read()
  assert not os.path.exists(os.path.join(workdir, "trainer.lock"))


def test_sequence_axis_across_processes_equals_one_process(interrupted, one_process):
  """The last checkpoint: after the kill, the rerun trained on (data=2, sequence=2), sequences split across hosts."""
  assert "mesh {'data': 2, 'fsdp': 1, 'sequence': 2, 'tensor': 1}" in interrupted["final"].output()
  difference = max_difference(saved_params(interrupted["workdir"], NUM_STEPS),
                              saved_params(one_process.workdir, NUM_STEPS))
  print(f"step {NUM_STEPS}, then (data=2, sequence=2) over 2 processes vs 1 x 4: largest relative RMS difference "
        f"{difference:.2e}")
  assert difference <= TOLERANCE


def test_launcher_arguments_come_from_the_mixers_variables():
  env = {distributed.COORDINATOR: "127.0.0.1:1234", distributed.NUM_PROCESSES: "2", distributed.PROCESS_ID: "1",
         distributed.HEARTBEAT_TIMEOUT: "8"}
  assert distributed.is_multi_host_platform(env)
  assert distributed.launcher_arguments(env) == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2,
                                                 "process_id": 1, "heartbeat_timeout_seconds": 8}
  assert distributed.launcher_arguments({}) == {}
  with pytest.raises(ValueError, match=distributed.PROCESS_ID):
    distributed.launcher_arguments({distributed.COORDINATOR: "h:1", distributed.NUM_PROCESSES: "2"})


class _Layout:
  """A stand-in for a sharding of a batch of 8 rows: {(process, device): rows}."""

  def __init__(self, rows):
    self.rows = rows

  def devices_indices_map(self, shape):
    assert shape == (8,)
    return {_Device(p, d): (slice(a, b),) for (p, d), (a, b) in self.rows.items()}


class _Device:
  def __init__(self, process_index, id_):
    self.process_index, self.id = process_index, id_

  def __hash__(self):
    return hash((self.process_index, self.id))


def test_each_host_reads_the_rows_its_devices_hold():
  across_data = _Layout({(0, 0): (0, 2), (0, 1): (2, 4), (1, 2): (4, 6), (1, 3): (6, 8)})
  assert [distributed.host_data_shard(across_data, 8, p) for p in (0, 1)] == [(0, 2), (1, 2)]
  across_sequence = _Layout({(0, 0): (0, 4), (0, 1): (4, 8), (1, 2): (0, 4), (1, 3): (4, 8)})
  assert [distributed.host_data_shard(across_sequence, 8, p) for p in (0, 1)] == [(0, 1), (0, 1)]
  interleaved = _Layout({(0, 0): (0, 2), (1, 1): (2, 4), (0, 2): (4, 6), (1, 3): (6, 8)})
  with pytest.raises(ValueError, match="contiguous block"):
    distributed.host_data_shard(interleaved, 8, 0)
