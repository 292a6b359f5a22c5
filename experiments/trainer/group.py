"""What the processes of a multi-host run do together: work that process 0 does first, then the others.

    group.lead_first(lambda: data.prepare(config.data), "prepare the data", then_others=True)
    with group.hold_workdir(workdir):      # process 0 holds the lock for the whole group
      ...

Every process learns whether process 0 succeeded, so a refusal on process 0 (a locked workdir, a bad dataset) stops
every process with an error instead of leaving the others waiting in a collective. One process: the work runs
here and nothing is exchanged.
"""
import contextlib

import jax
from jax.experimental import multihost_utils
import numpy as np

from experiments.trainer import workdir_lock


class LeadProcessError(RuntimeError):
  """Process 0 failed at a step that the whole group waits for; its own log holds the error."""


def agree(value: bool) -> bool:
  """Process 0's `value` on every process (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return bool(value)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(value))))


def lead_first(fn, what, *, then_others=False, error=LeadProcessError):
  """Runs `fn()` on process 0, then (with then_others) on the other processes once it succeeded there.

  When `fn` raises on process 0 the error propagates there and the other processes raise `error` naming `what`.
  Returns what `fn` returned on this process (None where it did not run).
  """
  lead = jax.process_index() == 0
  result, failure = None, None
  if lead:
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except  # re-raised below, after the others have heard of it
      failure = e
  if not agree(failure is None):
    if lead:
      raise failure
    raise error(f"process 0 could not {what}; its log says why")
  if then_others and not lead:
    result = fn()
  return result


@contextlib.contextmanager
def hold_workdir(workdir):
  """Holds the lock of `workdir` for every process of the run: process 0 takes it (`workdir_lock`), the others
  raise WorkdirLockedError when it could not."""
  lock = lead_first(lambda: workdir_lock.WorkdirLock(workdir).acquire(), f"take the lock of workdir {workdir}",
                    error=workdir_lock.WorkdirLockedError)
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
