"""A workdir holds one run: a changed config is refused untouched (or archived with resume=False), a second
trainer is refused while a live one holds the lock, checkpoints are checked against their SHA-256 sums, bad
values are refused before anything is written, and SIGTERM saves within one step."""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import lm, mqar
from experiments import train
from experiments.trainer import checkpoint, experiment, loop, resume, workdir_lock
from tests.experiments.test_train import tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(data_dir, **fields):
  """A 2-step tiny MQAR run checkpointed at every step."""
  config = tiny(mqar.get_config("retention,tiny"), data_dir, num_steps=2, vocab_size=32, seq_len=16, num_pairs=2)
  config.checkpoint_every = 1
  config.update(fields)
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """(config, workdir) of a finished 2-step run with checkpoints 1 and 2; tests change copies of it."""
  config = _config(data_dir)
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  loop.train_and_evaluate(config, workdir)
  return config, workdir


def _copy(trained, tmp_path):
  config, source = trained
  return config.copy_and_resolve_references(), shutil.copytree(source, str(tmp_path / "run"))


def _snapshot(workdir):
  """{relative path: SHA-256} of every file below `workdir`."""
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _metric_steps(workdir, name):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [row["step"] for row in map(json.loads, f) if name in row]


def test_changed_config_is_refused_and_leaves_the_workdir_untouched(trained, tmp_path, capsys):
  config, workdir = _copy(trained, tmp_path)
  before = _snapshot(workdir)
  config.model.d_model = 32
  assert train.run(config, workdir) == 1
  err = capsys.readouterr().err
  assert "config.model.d_model: 16 in the workdir, 32 now" in err, err
  assert "params/backbone/final_norm/scale: checkpoint (16,), this config builds (32,)" in err, err
  assert "--config.resume=False" in err
  assert _snapshot(workdir) == before
  # Without config.json the checkpoint's shapes refuse it, and nothing is called corrupt or moved.
  os.remove(os.path.join(workdir, "config.json"))
  before = _snapshot(workdir)
  assert train.run(config, workdir) == 1
  err = capsys.readouterr().err
  assert "does not fit the model" in err and "checkpoint (16,), this config builds (32,)" in err, err
  assert _snapshot(workdir) == before


def test_resume_false_archives_the_previous_run_and_starts_afresh(trained, tmp_path, capsys):
  config, workdir = _copy(trained, tmp_path)
  old = _snapshot(workdir)
  config.model.d_model = 32
  config.resume = False
  assert train.run(config, workdir) == 0
  assert "moved the previous run to" in capsys.readouterr().out
  (stamp,) = os.listdir(os.path.join(workdir, "archive"))
  assert _snapshot(os.path.join(workdir, "archive", stamp)) == old
  assert resume.saved_config(workdir)["model"]["d_model"] == 32
  assert _metric_steps(workdir, "train/loss") == [1, 2]


def test_second_trainer_is_refused_naming_the_holder(trained, tmp_path, capsys):
  config, workdir = _copy(trained, tmp_path)
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from experiments.trainer import workdir_lock; "
       "workdir_lock.WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)", workdir],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    before = _snapshot(workdir)
    assert train.run(config, workdir) == 1
    err = capsys.readouterr().err
    assert f"in use by another trainer: pid {holder.pid} on host {socket.gethostname()} (started " in err, err
    assert _snapshot(workdir) == before
  finally:
    holder.kill()
    holder.wait()


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys):
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  lock_file = tmp_path / workdir_lock.LOCK_FILE
  lock_file.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "2001-02-03T04:05:06"}))
  with workdir_lock.hold(str(tmp_path)):
    assert workdir_lock.read_holder(str(tmp_path))["pid"] == os.getpid()
  assert f"taking over the stale lock of workdir {tmp_path}: pid {gone.pid}" in capsys.readouterr().err
  assert not lock_file.exists()
  # A lock held from another host cannot be checked from here: it is never taken over.
  lock_file.write_text(json.dumps({"pid": gone.pid, "host": "elsewhere", "started": "2001-02-03T04:05:06"}))
  with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {gone.pid} on host elsewhere"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()


def test_flipped_byte_falls_back_to_the_previous_checkpoint(trained, tmp_path, capsys):
  config, workdir = _copy(trained, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "2")
  largest = max((os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns), key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.seek(os.path.getsize(largest) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  loop.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert f"checkpoint {step_dir} is corrupt or partial (file {os.path.relpath(largest, step_dir)} fails its " \
         "SHA-256 checksum)" in out, out
  assert "resumed from checkpoint step 1" in out
  assert os.listdir(os.path.join(workdir, "corrupt_checkpoints"))
  assert _metric_steps(workdir, "train/loss") == [1, 2]  # step 2 is trained again, its row not duplicated
  assert _metric_steps(workdir, "eval/loss") == [2]


def test_non_finite_checkpoint_is_bad_not_a_divergence(trained, tmp_path, capsys):
  config, workdir = _copy(trained, tmp_path)
  exp = experiment.create(config)
  ckpt = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), every=1)
  state = ckpt.restore(2, exp.state, exp.shardings)
  state["params"] = jax.tree.map(lambda x: x * np.nan, state["params"])
  ckpt.save(3, state)
  restored, step = ckpt.restore_latest(exp.state, exp.shardings)
  assert step == 2 and not checkpoint.non_finite_paths(restored)
  assert "holds non-finite values (NaN or inf)" in capsys.readouterr().out
  # The loss of the first step after a restore comes before any update: non-finite, it blames the checkpoint.
  metrics = {"loss_sum": np.nan, "count": 4.0, "grad_norm": np.nan, "param_norm": 1.0}
  first = loop.non_finite_message(3, metrics, 2, ckpt)
  assert "the first step after restoring checkpoint" in first and "not a divergence" in first
  later = loop.non_finite_message(5, metrics, 2, ckpt)
  assert "training diverged" in later and "Last good checkpoint" in later


def test_another_dataset_named_on_the_command_line_brings_its_own_fields(tmp_path, capsys):
  # As `--config.data.name=lm1b` leaves it: the config file's byte-corpus fields, the new name.
  config = lm.get_config("gla,tiny")
  config.data.data_dir = str(tmp_path / "data")
  config.data.name = "lm1b"
  config = train.switch_dataset(config, {"data.name": "lm1b", "data.data_dir": config.data.data_dir})
  assert "corpus" not in config.data and config.data.seq_len == 256
  # No download here: the catalog dataset is not in data_dir, and the message says how to prepare it.
  assert train.run(config, str(tmp_path / "run")) == 1
  assert f"dataset 'lm1b' is not prepared in data_dir='{tmp_path / 'data'}'" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "run")
  # A field of the old dataset given on the command line is still reported as unknown to the new one.
  config.data.corpus = "texts"
  config = train.switch_dataset(config, {"data.name": "lm1b", "data.corpus": "texts"})
  assert train.run(config, str(tmp_path / "run")) == 1
  assert "unknown fields ['corpus'] for dataset 'lm1b'" in capsys.readouterr().err


@pytest.mark.parametrize("num_steps", [0, -5])
def test_non_positive_num_steps_is_refused_before_anything_is_written(tmp_path, data_dir, num_steps):
  config = _config(data_dir, num_steps=num_steps)
  with pytest.raises(ValueError, match=rf"config\.num_steps={num_steps}"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_sigterm_saves_a_checkpoint_within_one_step(tmp_path, data_dir, monkeypatch):
  make_train_step = loop.step_lib.make_train_step

  def sigterm_at_step_3(*args, **kwargs):
    step = make_train_step(*args, **kwargs)

    def wrapped(state, batch):
      if int(state["step"]) == 2:  # computing step 3
        os.kill(os.getpid(), signal.SIGTERM)
      return step(state, batch)
    return wrapped

  monkeypatch.setattr(loop.step_lib, "make_train_step", sigterm_at_step_3)
  config = _config(data_dir, num_steps=50, log_every=25, checkpoint_every=25)
  result = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["preempted"] and result["step"] == 3
  assert checkpoint.Checkpoints(os.path.join(tmp_path, "run", "checkpoints"), every=1).steps() == [3]
