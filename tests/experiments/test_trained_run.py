"""One tiny MQAR run (a module fixture, trained as the command line trains) and what is done with it: the loss fell
and the curves are drawn, the same command killed and rerun reaches the same parameters, a corrupt latest
checkpoint falls back to the previous one, a loss that turns non-finite stops training, evaluate and generate read
the checkpoint."""
import contextlib
import io
import os
import shutil
import subprocess
import sys
import time

import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import mqar
from experiments import data, evaluate, generate, train
from experiments.trainer import checkpoint, experiment, loop, restore
from experiments.trainer import logging as logging_lib
from tests.experiments.test_train import train_losses

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_STEPS = 40
EVERY = 5  # steps between checkpoints and between logged train metrics
DATA = dict(vocab_size=32, seq_len=16, num_pairs=2, num_train=64, num_validation=16, num_test=16)
FLAGS = {**{f"data.{k}": v for k, v in DATA.items()}, "model.d_model": 16, "model.num_layers": 1,
         "model.channel_mixer": "none", "batch_size": 8, "eval_batch_size": 16, "num_steps": NUM_STEPS,
         "checkpoint_every": EVERY, "log_every": EVERY, "eval_every": 0, "optimizer.learning_rate": 1e-2,
         "optimizer.warmup_steps": 3}
# Every program compiled in this module, in this process or in the killed command, goes to one persistent
# compilation cache: they all train, evaluate or restore the same model, so each is compiled once.
CACHE_OPTIONS = {"jax_compilation_cache_dir": None, "jax_persistent_cache_min_compile_time_secs": 0.0}


def _config(data_dir):
  """The config that `_command` gives on the command line."""
  config = mqar.get_config("retention,tiny")
  config.update_from_flattened_dict({"data.data_dir": str(data_dir), **FLAGS})
  return config


def _command(workdir, data_dir):
  flags = {"data.data_dir": data_dir, **FLAGS}
  return ([sys.executable, "-m", "experiments.train", "--config", "configs/mqar.py:retention,tiny",
           "--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in flags.items()])


def _run(command):
  """subprocess.Popen(command) in the repository, sharing this module's compilation cache."""
  env = dict(os.environ, **{name.upper(): str(getattr(jax.config, name)) for name in CACHE_OPTIONS})
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _saved_params(workdir, step):
  """The parameters of checkpoint `step` of `workdir`, read as saved (no model is built)."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  params = manager.restore(step, args=ocp.args.StandardRestore())["params"]
  manager.close()
  return jax.device_get(params)


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _committed(workdir, step):
  return os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache_dir(tmp_path_factory):
  """A persistent compilation cache for this module (CACHE_OPTIONS), the previous settings restored after it."""
  previous = {name: getattr(jax.config, name) for name in CACHE_OPTIONS}
  values = dict(CACHE_OPTIONS, jax_compilation_cache_dir=str(tmp_path_factory.mktemp("compilation_cache")))
  for name, value in values.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()  # the cache is set up again, in the new directory, at the next compilation
  yield values["jax_compilation_cache_dir"]
  for name, value in previous.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("data")
  data.prepare(_config(path).data)  # once, before two processes read it
  return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """(workdir, printed output) of the uninterrupted run, trained in this process by the command line's `run`."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert train.run(_config(data_dir), workdir) == 0
  return workdir, printed.getvalue()


def test_the_run_learns_and_reports(trained):
  workdir, stdout = trained
  assert "starting from scratch" in stdout and "accuracy=" in stdout and f"checkpoints/{NUM_STEPS}" in stdout
  losses = train_losses(workdir)
  assert len(losses) == NUM_STEPS // EVERY and np.isfinite(losses).all()
  assert losses[-1] < losses[0] - 0.05, losses
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [30, 35, 40]  # keep 3


def test_killed_run_resumes_to_the_same_parameters(tmp_path, trained, data_dir, capsys):
  killed = str(tmp_path / "killed")
  victim = _run(_command(killed, data_dir))
  deadline = time.time() + 300
  while not _committed(killed, EVERY) and victim.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  victim.kill()
  victim_output = victim.communicate()[0]
  assert _committed(killed, EVERY), victim_output
  assert not _committed(killed, NUM_STEPS), "the run finished before it could be killed"
  capsys.readouterr()
  result = loop.train_and_evaluate(experiment.load_config(killed), killed)  # the run's own config.json
  assert "resumed from checkpoint step" in capsys.readouterr().out
  assert result["step"] == NUM_STEPS and not result["preempted"]
  _assert_same(_saved_params(trained[0], NUM_STEPS), _saved_params(killed, NUM_STEPS))


def test_corrupt_latest_checkpoint_falls_back_and_training_continues_identically(tmp_path, trained, capsys):
  workdir = str(tmp_path / "copy")
  shutil.copytree(trained[0], workdir)
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(NUM_STEPS))):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0garbage")
  capsys.readouterr()
  loop.train_and_evaluate(experiment.load_config(workdir), workdir)
  out = capsys.readouterr().out
  assert "corrupt or partial" in out and f"resumed from checkpoint step {NUM_STEPS - EVERY}" in out, out
  assert os.listdir(os.path.join(workdir, "corrupt_checkpoints"))
  _assert_same(_saved_params(trained[0], NUM_STEPS), _saved_params(workdir, NUM_STEPS))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, trained, monkeypatch):
  make_train_step = loop.step_lib.make_train_step

  def nan_from_step_4(*args, **kwargs):
    step = make_train_step(*args, **kwargs)

    def wrapped(state, batch):
      state, metrics = step(state, batch)
      bad = np.float32(np.nan) if int(state["step"]) >= 4 else np.float32(0)
      return state, {**metrics, "loss_sum": metrics["loss_sum"] + bad}
    return wrapped

  monkeypatch.setattr(loop.step_lib, "make_train_step", nan_from_step_4)
  config = experiment.load_config(trained[0])
  config.checkpoint_every = 2
  workdir = str(tmp_path / "run")
  with pytest.raises(loop.NonFiniteLossError, match=r"non-finite training loss \(nan.* at step 4: training "
                                                    r"stopped\. Last good checkpoint: .*checkpoints/2 \(step 2\)"):
    loop.train_and_evaluate(config, workdir)
  assert checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), every=1).steps() == [2]


def test_evaluate_reproduces_the_final_evaluation(trained):
  workdir = trained[0]
  result = evaluate.evaluate_run(workdir)
  assert (result["step"], result["split"]) == (NUM_STEPS, "validation")
  final = dict(logging_lib.read_metrics(workdir)["eval/loss"])[NUM_STEPS]
  np.testing.assert_allclose(result["loss"], final, rtol=1e-5)


def test_greedy_generation_through_the_cache_follows_the_full_forward_pass(trained):
  exp, state, step = restore.load_run(trained[0])
  assert step == NUM_STEPS
  prompt = np.array([[3, 20, 5, 17, 9], [7, 30, 2, 16, 3]], np.int32)
  tokens, per_token = generate.generate(exp.model, state["params"], prompt, 6, rng=jax.random.key(0),
                                        temperature=0.0)
  # Greedy decoding through the cache picks the argmax of the full forward pass at every position.
  full = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
  logits = jax.jit(exp.model.apply)({"params": state["params"]}, full)
  assert tokens.shape == (2, 6) and per_token > 0
  np.testing.assert_array_equal(tokens, np.argmax(logits[:, prompt.shape[1] - 1:], -1))


def test_the_run_draws_its_curves(trained):
  folder = os.path.join(trained[0], "plots")
  names = sorted(os.listdir(folder))
  assert "curves.png" in names and "loss.png" in names
  assert all(os.path.getsize(os.path.join(folder, n)) > 1000 for n in names)
