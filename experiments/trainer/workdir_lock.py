"""One trainer per workdir: a lock file `workdir/trainer.lock` holding the live trainer's pid, host and start time.

    with workdir_lock.hold(workdir):      # WorkdirLockedError, naming the holder, if another trainer runs there
      ...                                 # train

The file is created atomically (O_EXCL), so of two trainers starting together exactly one gets it. A lock left
behind by a trainer that died (its pid no longer runs on this host, or runs a process started after the lock) is
stale: it is taken over with a warning. A lock held from another host cannot be checked from here and is never
taken over; the message says how to remove it when that trainer is known to be gone. Imports nothing heavy.
"""
import contextlib
import datetime
import json
import os
import socket
import sys

LOCK_FILE = "trainer.lock"


class WorkdirLockedError(RuntimeError):
  """Another trainer holds the workdir; the message names it (pid, host, start time)."""


def _process_start_ticks(pid):
  """The start time of process `pid` in clock ticks since boot (Linux), or None where /proc cannot tell."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  # Field 22 (starttime); the command name (field 2) may hold spaces, so count from its closing parenthesis.
  fields = stat[stat.rindex(")") + 2:].split()
  return int(fields[19])


def _pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # a live process of another user
    return True
  return True


def describe(holder):
  """'pid 123 on host h (started 2025-01-01T12:00:00, command ...)' from the lock file's contents."""
  command = f", command: {holder['command']}" if holder.get("command") else ""
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')}"
          f"{command})")


def read_holder(workdir):
  """The lock file's contents as a dict, {} when it is unreadable (being written or damaged), None when absent."""
  return _read(os.path.join(workdir, LOCK_FILE))


def _read(path):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}


def is_stale(holder):
  """True when the lock's trainer is known to be gone: same host, and its pid is not running (or was reused)."""
  if not holder or holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
    return False
  if not _pid_alive(holder["pid"]):
    return True
  ticks = _process_start_ticks(holder["pid"])
  return ticks is not None and holder.get("start_ticks") is not None and ticks != holder["start_ticks"]


class WorkdirLock:
  """The lock on one workdir. acquire() takes it (or raises WorkdirLockedError), release() gives it back."""

  def __init__(self, workdir):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.held = False

  def _contents(self):
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "start_ticks": _process_start_ticks(os.getpid()), "command": " ".join(sys.argv)[:500]}

  def _create(self):
    """Creates the lock file if absent; True when this call created it."""
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(self._contents(), f)
      f.write("\n")
    return True

  def acquire(self):
    """Takes the lock, taking over a stale one with a warning; WorkdirLockedError when a live trainer holds it."""
    os.makedirs(self.workdir, exist_ok=True)
    for _ in range(3):
      if self._create():
        self.held = True
        return self
      holder = read_holder(self.workdir)
      if holder is None:  # released meanwhile
        continue
      if not is_stale(holder):
        raise WorkdirLockedError(
            f"workdir {self.workdir} is in use by another trainer: {describe(holder)}. Wait for it to finish or stop "
            f"it, or use another --workdir. If that trainer is known to be gone (e.g. its host was shut down), "
            f"delete {self.path}.")
      # Rename, not delete: of two trainers taking over the same stale lock only one rename succeeds; one that
      # renamed a fresh lock instead (taken meanwhile by the other) puts it back.
      moved = f"{self.path}.stale-{os.getpid()}"
      try:
        os.rename(self.path, moved)
      except FileNotFoundError:
        continue
      if _read(moved) != holder:
        os.rename(moved, self.path)
        continue
      os.remove(moved)
      print(f"WARNING: taking over the stale lock of workdir {self.workdir}: {describe(holder)} is no longer "
            "running", file=sys.stderr, flush=True)
    raise WorkdirLockedError(f"workdir {self.workdir}: could not take the lock {self.path}; is another trainer "
                             "starting there?")

  def release(self):
    """Removes the lock file if this process still holds it."""
    if not self.held:
      return
    self.held = False
    holder = read_holder(self.workdir)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
      os.remove(self.path)


@contextlib.contextmanager
def hold(workdir, *, enabled=True):
  """Holds the lock of `workdir` for the duration of the block (does nothing when not enabled)."""
  if not enabled:
    yield None
    return
  lock = WorkdirLock(workdir).acquire()
  try:
    yield lock
  finally:
    lock.release()
