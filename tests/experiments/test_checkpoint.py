"""Checkpoints: a killed run resumes to the same parameters, a corrupt latest checkpoint falls back to the
previous one, and a non-finite loss stops training while keeping the last good checkpoint."""
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import mqar
from experiments import data
from experiments.trainer import checkpoint, experiment, loop
from tests.experiments.test_train import tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_FLAGS = dict(vocab_size=32, seq_len=16, num_pairs=2)


def _config(data_dir, **fields):
  config = tiny(mqar.get_config("retention,tiny"), data_dir, **TINY_FLAGS)
  config.update(fields)
  return config


def _params(workdir, step):
  config = experiment.load_config(workdir)
  exp = experiment.create(config)
  state = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), every=1).restore(step, exp.state,
                                                                                       exp.shardings)
  return jax.device_get(state["params"])


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _command(workdir, data_dir, num_steps):
  flags = {"data.data_dir": data_dir, **{f"data.{k}": v for k, v in TINY_FLAGS.items()}, "data.num_train": 64,
           "data.num_validation": 16, "data.num_test": 16, "model.d_model": 16, "model.num_layers": 1,
           "model.channel_mixer": "none", "batch_size": 8, "eval_batch_size": 16, "num_steps": num_steps,
           "checkpoint_every": 5, "log_every": 5, "eval_every": 0, "plot": False,
           "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 3}
  return ([sys.executable, "-m", "experiments.train", "--config", "configs/mqar.py:retention,tiny",
           "--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in flags.items()])


def _committed(workdir, step):
  return os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
  data_dir = tmp_path / "data"
  data.prepare(_config(data_dir).data)  # once, before two processes read it
  num_steps = 40
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  run = lambda w: subprocess.Popen(_command(w, data_dir, num_steps), cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
  uninterrupted, victim = run(straight), run(killed)
  deadline = time.time() + 300
  while not _committed(killed, 5) and victim.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  victim.kill()
  victim_output = victim.communicate()[0]
  assert _committed(killed, 5), victim_output
  assert not _committed(killed, num_steps), "the run finished before it could be killed"
  resumed = subprocess.run(_command(killed, data_dir, num_steps), cwd=REPO, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert "resumed from checkpoint step" in resumed.stdout
  assert "accuracy=" in resumed.stdout
  out = uninterrupted.communicate(timeout=300)[0]
  assert uninterrupted.returncode == 0, out
  _assert_same(_params(str(straight), num_steps), _params(str(killed), num_steps))


def test_corrupt_latest_checkpoint_falls_back_and_training_continues_identically(tmp_path, capsys):
  config = _config(tmp_path / "data", num_steps=4, checkpoint_every=2)
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(config, workdir)
  final = _params(workdir, 4)
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "4")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0garbage")
  capsys.readouterr()
  loop.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert "corrupt or partial" in out and "resumed from checkpoint step 2" in out, out
  assert os.listdir(os.path.join(workdir, "corrupt_checkpoints"))
  _assert_same(final, _params(workdir, 4))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  make_train_step = loop.step_lib.make_train_step

  def nan_from_step_4(*args, **kwargs):
    step = make_train_step(*args, **kwargs)

    def wrapped(state, batch):
      state, metrics = step(state, batch)
      bad = np.float32(np.nan) if int(state["step"]) >= 4 else np.float32(0)
      return state, {**metrics, "loss_sum": metrics["loss_sum"] + bad}
    return wrapped

  monkeypatch.setattr(loop.step_lib, "make_train_step", nan_from_step_4)
  config = _config(tmp_path / "data", num_steps=8, checkpoint_every=2)
  workdir = str(tmp_path / "run")
  with pytest.raises(loop.NonFiniteLossError, match=r"non-finite training loss \(nan.* at step 4: training "
                                                    r"stopped\. Last good checkpoint: .*checkpoints/2 \(step 2\)"):
    loop.train_and_evaluate(config, workdir)
  assert checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), every=1).steps() == [2]
