"""Whether a workdir's run may go on under a config: the saved config, archiving a run, metrics past a resume.

A workdir holds one run. Its `config.json` is written when the run starts and never rewritten: a rerun whose
config differs in a field that shapes the run (anything but the bookkeeping fields in OPERATIONAL) is refused
with ConfigMismatchError, which names each field with both values, and nothing in the workdir is touched. With
`--config.resume=False` the previous run is moved whole into `workdir/archive/<date-time>/` and a new one starts.

    saved = resume.saved_config(workdir)                    # None in a new workdir
    lines = resume.differences(saved, config)               # ["model.d_model: 32 in the workdir, 64 now", ...]
    resume.archive(workdir)                                 # workdir/archive/20250101-120000
    resume.drop_metrics_after(workdir, step)                # metrics.jsonl rows past the resumed step go
"""
import datetime
import json
import os

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
ARCHIVE_DIR = "archive"
# Run contents moved by archive(); the workdir lock and earlier archives stay.
RUN_ENTRIES = (CONFIG_FILE, METRICS_FILE, "checkpoints", "corrupt_checkpoints", "tensorboard", "plots")
# Fields that may change between the runs of one workdir: how often to log, evaluate and checkpoint, where the
# data lie, the device mesh and its layout over processes (checkpoints restore onto any mesh), and resume itself.
OPERATIONAL = ("log_every", "eval_every", "eval_steps", "eval_batch_size", "checkpoint_every", "keep_checkpoints",
               "plot", "resume", "mesh", "process_axis", "data.data_dir")


class ConfigMismatchError(ValueError):
  """The config differs from the one the workdir's run was trained with; the message names the fields."""


def config_dict(config):
  """A ConfigDict (or FrozenConfigDict) as the plain JSON values that `config.json` holds."""
  return json.loads(config.to_json_best_effort())


def saved_config(workdir):
  """The plain dict of `workdir/config.json`, or None when there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_config_once(workdir, config):
  """Writes `workdir/config.json` unless it exists (it is never rewritten); True when written."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    return False
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp, path)
  return True


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _operational(name):
  return any(name == f or name.startswith(f + ".") for f in OPERATIONAL)


def differences(saved, config):
  """Lines 'field: SAVED in the workdir, NOW now' for each field outside OPERATIONAL that differs."""
  old, new = _flatten(saved), _flatten(config_dict(config))
  lines = []
  for name in sorted(set(old) | set(new)):
    if _operational(name) or old.get(name, "<absent>") == new.get(name, "<absent>"):
      continue
    before = json.dumps(old[name]) if name in old else "absent"
    after = json.dumps(new[name]) if name in new else "absent"
    lines.append(f"config.{name}: {before} in the workdir, {after} now")
  return lines


def mismatch_message(workdir, lines, checkpoint_lines=()):
  """The ConfigMismatchError text: the differing fields, the arrays they reshape, and the two ways on."""
  text = (f"workdir {workdir} holds a run trained with another config (its {CONFIG_FILE}); nothing in it was "
          "changed. The fields that differ:\n  " + "\n  ".join(lines))
  if checkpoint_lines:
    text += "\nWith them the latest checkpoint does not fit the model:\n  " + "\n  ".join(checkpoint_lines)
  return (text + "\nTo train this config, use a new --workdir, or add --config.resume=False to move the run there "
          f"into {os.path.join(workdir, ARCHIVE_DIR, '<date-time>')} and start afresh.")


def has_run(workdir):
  return any(os.path.exists(os.path.join(workdir, name)) for name in RUN_ENTRIES)


def archive(workdir):
  """Moves the run in `workdir` (RUN_ENTRIES present) into workdir/archive/<date-time>/; returns that folder."""
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  target = os.path.join(workdir, ARCHIVE_DIR, stamp)
  suffix = 1
  while os.path.exists(target):
    suffix += 1
    target = os.path.join(workdir, ARCHIVE_DIR, f"{stamp}-{suffix}")
  os.makedirs(target)
  for name in RUN_ENTRIES:
    if os.path.exists(os.path.join(workdir, name)):
      os.rename(os.path.join(workdir, name), os.path.join(target, name))
  return target


def _row_step(line):
  """The step of a metrics row; infinity for a line cut short by a crash (it is dropped)."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return float("inf")


def drop_metrics_after(workdir, step):
  """Removes the rows of `workdir/metrics.jsonl` past `step` (written after the checkpoint a run resumes from, so
  about to be written again); returns how many went."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = [line if line.endswith("\n") else line + "\n" for line in lines if _row_step(line) <= step]
  if kept == lines:
    return 0
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)
  return len(lines) - len(kept)
