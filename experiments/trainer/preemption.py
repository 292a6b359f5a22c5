"""Preemption: SIGTERM to any process of a run makes every process save a checkpoint at the same step and stop.

    with preemption.watch() as preempted:
      for step in ...:
        state = train_step(state, batch)
        if preempted(step):        # call once per step, on every process, with increasing steps
          save(step, state)
          break

One process: a SIGTERM handler raises a flag, read after every step. Several processes (jax.distributed): the
signal reaches one process or some of them, yet all must save the same step together, so JAX's preemption sync
service decides: the process that caught SIGTERM tells the coordination service, which picks the first step that
no process has passed yet, and `preempted(step)` turns True at that step on every process.
"""
import contextlib
import signal

import jax
from jax.experimental import multihost_utils


@contextlib.contextmanager
def _sigterm_flag():
  """Yields a dict whose "set" turns True when SIGTERM arrives."""
  flag = {"set": False}

  def handler(signum, frame):
    del signum, frame
    flag["set"] = True

  try:
    previous = signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread: no handler can be installed
    yield flag
    return
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def watch():
  """Yields `preempted(step) -> bool`: True at the step where the run (every process of it) saves and stops.

  With several processes, JAX's own SIGTERM handler (installed by `jax.distributed.initialize`) is left in place;
  a Python handler would replace it.
  """
  if jax.process_count() > 1:
    yield multihost_utils.reached_preemption_sync_point
    return
  with _sigterm_flag() as flag:
    yield lambda step: flag["set"]
