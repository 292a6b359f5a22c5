"""Checkpoints of the train state with orbax: periodic and final saves, keep-last-K, resume with fallback.

    ckpt = Checkpoints(workdir / "checkpoints", every=500, keep=3)
    state, step = ckpt.restore_latest(state, shardings)   # (state, 0) when there is none
    ckpt.maybe_save(step, state)                           # every `every` steps
    ckpt.save(step, state)                                 # now (end of run, SIGTERM)

A checkpoint that cannot be read (a crash while writing, a damaged file) is reported, moved aside
to `<directory>/../corrupt_checkpoints/`, and the previous one restored.
"""
import os
import shutil
import time

from absl import logging
import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """Orbax CheckpointManager over one directory holding `{step}/` checkpoints of the whole train state."""

  def __init__(self, directory, *, every, keep=3):
    if every < 1:
      raise ValueError(f"checkpoint every={every}: expected >= 1")
    if keep < 1:
      raise ValueError(f"checkpoint keep={keep}: expected >= 1")
    self.directory = os.path.abspath(os.fspath(directory))
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self):
    return sorted(self.manager.all_steps())

  def latest_step(self):
    steps = self.steps()
    return steps[-1] if steps else None

  def path(self, step):
    return os.path.join(self.directory, str(step))

  def save(self, step, state):
    """Saves `state` as checkpoint `step` (no-op when that step is already saved)."""
    if step in self.manager.all_steps():
      return False
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self.manager.wait_until_finished()
    return True

  def maybe_save(self, step, state):
    return self.save(step, state) if step % self.every == 0 else False

  def restore(self, step, state, shardings):
    """Checkpoint `step` laid out like `state` (arrays or ShapeDtypeStructs) with `shardings`."""
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def restore_latest(self, state, shardings):
    """(restored state, its step) from the newest readable checkpoint, or (state, 0) when there is none.

    Unreadable checkpoints are logged and moved aside; the one before them is tried next.
    """
    for step in reversed(self.steps()):
      try:
        return self.restore(step, state, shardings), step
      except Exception as e:  # pylint: disable=broad-except  # orbax raises many kinds on damaged files
        moved = self._move_aside(step)
        logging.warning("checkpoint %s cannot be restored (%s: %s); moved it to %s and trying the previous one",
                        self.path(step), type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "", moved)
        print(f"WARNING: checkpoint {self.path(step)} is corrupt or partial ({type(e).__name__}); "
              f"falling back to the previous one", flush=True)
    return state, 0

  def _move_aside(self, step):
    target = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints", f"{step}-{int(time.time())}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(self.path(step), target)
    self.manager.reload()
    return target

  def close(self):
    self.manager.close()
