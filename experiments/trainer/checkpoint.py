"""Checkpoints of the train state with orbax: periodic and final saves, keep-last-K, checksums, resume with fallback.

    ckpt = Checkpoints(workdir / "checkpoints", every=500, keep=3)
    state, step = ckpt.restore_latest(state, shardings)   # (state, 0) when there is none
    ckpt.maybe_save(step, state)                           # every `every` steps
    ckpt.save(step, state)                                 # now (end of run, SIGTERM)

Every saved checkpoint gets `{step}/SHA256SUMS` over its files (`checksums`). Restoring tells three cases apart:
- incompatible: the checkpoint's arrays do not fit the state this config builds (other shapes or parameter
  names). IncompatibleCheckpointError names the parameter paths and both shapes; nothing is moved or changed.
- corrupt: a file fails its checksum or is missing (or, for a checkpoint saved before checksums existed, it cannot
  be read), or the restored values are not finite. restore_latest reports it, moves it aside to
  `<directory>/../corrupt_checkpoints/`, and restores the previous one.
- a checkpoint that passes its checksums and fits, yet orbax cannot read: CheckpointRestoreError, left in place
  (the cause is the environment or a version change, not the files).
"""
import os
import shutil
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import orbax.checkpoint as ocp

from experiments.trainer import checksums

MAX_LISTED = 8  # mismatching arrays named in a message


class IncompatibleCheckpointError(ValueError):
  """A checkpoint's arrays do not fit the train state of this config; the message names paths and shapes."""


class CorruptCheckpointError(RuntimeError):
  """A checkpoint's files fail their checksums, are missing or unreadable, or hold non-finite values."""


class CheckpointRestoreError(RuntimeError):
  """A checkpoint that passes its checksums and fits the state could not be read (left in place)."""


def barrier(name):
  """Waits until every process reaches the barrier `name` (nothing to wait for in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def key_path(path):
  """'params/backbone/block_0/kernel' from a jax key path (dict keys, attributes and indices alike)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _shapes(tree):
  """{path: shape tuple} of a tree of arrays, ShapeDtypeStructs or orbax ArrayMetadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {key_path(p): tuple(x.shape) for p, x in leaves if hasattr(x, "shape")}


def shape_mismatches(saved, wanted):
  """Lines naming each array whose path or shape differs between `saved` and `wanted` ({path: shape} maps)."""
  lines = []
  for path in sorted(set(saved) | set(wanted), key=lambda p: (not p.startswith("params/"), p)):  # params first
    if path not in saved:
      lines.append(f"{path}: absent from the checkpoint, this config builds {wanted[path]}")
    elif path not in wanted:
      lines.append(f"{path}: checkpoint {saved[path]}, absent from what this config builds")
    elif saved[path] != wanted[path]:
      lines.append(f"{path}: checkpoint {saved[path]}, this config builds {wanted[path]}")
  return lines


def _first_line(e):
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def non_finite_paths(state):
  """Paths of the floating-point arrays of `state` holding a NaN or an infinity."""
  leaves = [(key_path(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  finite = jax.device_get([jnp.all(jnp.isfinite(x)) for _, x in leaves])
  return [path for (path, _), ok in zip(leaves, finite) if not ok]


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
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=ocp.StandardCheckpointHandler())

  def steps(self):
    return sorted(self.manager.all_steps())

  def latest_step(self):
    steps = self.steps()
    return steps[-1] if steps else None

  def path(self, step):
    return os.path.join(self.directory, str(step))

  def save(self, step, state):
    """Saves `state` as checkpoint `step` with its checksums (no-op when that step is already saved)."""
    if step in self.manager.all_steps():
      return False
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      checksums.write(self.path(step))
    barrier(f"checksums of checkpoint {step}")
    return True

  def maybe_save(self, step, state):
    return self.save(step, state) if step % self.every == 0 else False

  def saved_shapes(self, step):
    """{array path: shape} of checkpoint `step`, read from its metadata."""
    return _shapes(self.manager.item_metadata(step))

  def mismatches(self, step, state):
    """Lines naming the arrays of checkpoint `step` that do not fit `state` by path or shape ([] when it fits)."""
    return shape_mismatches(self.saved_shapes(step), _shapes(state))

  def restore(self, step, state, shardings):
    """Checkpoint `step` laid out like `state` (arrays or ShapeDtypeStructs) with `shardings`.

    Raises IncompatibleCheckpointError, CorruptCheckpointError or CheckpointRestoreError (module docstring).
    """
    path = self.path(step)
    try:
      problem = checksums.verify(path)
      verified = True
    except checksums.NoManifest:
      problem, verified = None, False
      logging.warning("checkpoint %s has no %s (saved before checksums were written): restoring it unverified",
                      path, checksums.MANIFEST)
    if problem:
      raise CorruptCheckpointError(problem)
    try:
      saved = self.saved_shapes(step)
    except Exception as e:  # pylint: disable=broad-except  # orbax raises many kinds on damaged metadata
      self._unreadable(path, verified, "its metadata", e)
    lines = shape_mismatches(saved, _shapes(state))
    if lines:
      raise IncompatibleCheckpointError(incompatible_message(path, lines))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except
      self._unreadable(path, verified, "its arrays", e)

  @staticmethod
  def _unreadable(path, verified, what, e):
    if verified:
      raise CheckpointRestoreError(
          f"checkpoint {path} passes its checksums but orbax cannot read {what} ({_first_line(e)}); it is left in "
          "place. A different orbax or jax version, or too little memory, can cause this.") from e
    raise CorruptCheckpointError(f"it has no checksums and reading {what} failed: {_first_line(e)}") from e

  def restore_latest(self, state, shardings, *, move_aside=True):
    """(restored state, its step) from the newest good checkpoint, or (state, 0) when there is none.

    A corrupt checkpoint, or one holding non-finite values, is reported and moved aside (left in place, only
    skipped, with move_aside=False), and the one before it is tried next. IncompatibleCheckpointError and
    CheckpointRestoreError propagate: they are no reason to throw a checkpoint away.
    """
    for step in reversed(self.steps()):
      try:
        restored = self.restore(step, state, shardings)
        bad = non_finite_paths(restored)
        if bad:
          raise CorruptCheckpointError(f"it holds non-finite values (NaN or inf) in {len(bad)} arrays, e.g. "
                                       f"{', '.join(bad[:3])}")
        return restored, step
      except CorruptCheckpointError as e:
        where = f"moved it to {self._move_aside(step)}" if move_aside else "left it in place"
        logging.warning("checkpoint %s is corrupt or partial: %s; %s", self.path(step), e, where)
        print(f"WARNING: checkpoint {self.path(step)} is corrupt or partial ({e}); {where} and falling back to the "
              "previous one", flush=True)
    return state, 0

  def _move_aside(self, step):
    target = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints", f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(self.path(step), target)
    barrier(f"moved aside checkpoint {step}")
    self.manager.reload()
    return target

  def close(self):
    self.manager.close()


def incompatible_message(path, lines):
  """The IncompatibleCheckpointError text: which arrays differ (paths, both shapes), and what to do."""
  listed = "\n  ".join(lines[:MAX_LISTED]) + (f"\n  ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED
                                              else "")
  return (f"checkpoint {path} does not fit the model this config builds ({len(lines)} arrays differ):\n  {listed}\n"
          "Nothing was changed. Use the config it was trained with (the workdir's config.json), or another workdir.")
