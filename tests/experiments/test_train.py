"""A few train steps on each task config lower the loss (MQAR's run: test_trained_run); configs with tiny models and
datasets."""
import json
import os

import numpy as np
import pytest

from configs import image, listops, lm, pathfinder
from experiments.trainer import checkpoint, loop


def tiny(config, data_dir, *, num_steps=8, mixer=None, d_model=16, **data_fields):
  """`config` shrunk for tests: a 1-layer d_model=16 model, batches of 8, small generated data in data_dir."""
  config.model.d_model = d_model
  config.model.num_layers = 1
  config.model.channel_mixer = "none"
  if mixer:
    config.model.mixer = mixer
  if "data_dir" in config.data:
    config.data.data_dir = str(data_dir)
  for name in ("num_train", "num_validation", "num_test"):
    if name in config.data:
      config.data[name] = {"num_train": 64}.get(name, 16)
  config.data.update(data_fields)
  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_steps = num_steps
  config.log_every = 1
  config.eval_every = 0
  config.checkpoint_every = num_steps
  config.optimizer.learning_rate = 1e-2
  config.optimizer.warmup_steps = 0
  config.optimizer.weight_decay = 0.0
  config.plot = False
  return config


def train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r["train/loss"] for r in rows if "train/loss" in r]


def make_text_dir(path):
  """A tiny corpus: a few repetitive Python-like files."""
  os.makedirs(path, exist_ok=True)
  for i in range(4):
    with open(os.path.join(path, f"f{i}.py"), "w") as f:
      f.write("".join(f"def f{j}(x):\n    return x + {j}\n\n" for j in range(40)))
  return str(path)


def _assert_learns(config, workdir, *, epoch):
  """Trains `config`; the mean train loss of its last `epoch` steps is below that of its first `epoch` steps (each
  window covers the whole training set once)."""
  result = loop.train_and_evaluate(config, str(workdir))
  assert checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), every=1).steps() == [config.num_steps]
  losses = train_losses(workdir)
  assert len(losses) == config.num_steps and np.isfinite(losses).all()
  assert np.mean(losses[-epoch:]) < np.mean(losses[:epoch]) - 0.05, losses
  assert 0.0 <= result["accuracy"] <= 1.0 and result["count"] > 0
  return result


def test_lm_learns_on_local_text(tmp_path):
  config = tiny(lm.get_config("gla,tiny"), tmp_path / "data", corpus=make_text_dir(tmp_path / "text"), seq_len=32,
                num_steps=16)
  config.eval_steps = 2
  _assert_learns(config, tmp_path / "run", epoch=4)


def test_listops_learns(tmp_path):
  config = tiny(listops.get_config("linear_attention,tiny"), tmp_path / "data", num_steps=16, seq_len=48,
                min_length=10, max_length=48, max_depth=3, max_args=4)
  _assert_learns(config, tmp_path / "run", epoch=8)


@pytest.fixture(scope="module")
def pathfinder_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("pathfinder")


@pytest.mark.parametrize("as_tokens", [True, False], ids=["pixel_tokens", "patches"])
def test_pathfinder_and_image_learn(tmp_path, pathfinder_dir, as_tokens):
  # The image config (patch embedding, MD-TPE) on locally generated Pathfinder images, so nothing is downloaded.
  config = pathfinder.get_config("retention,tiny") if as_tokens else image.get_config("vssd,tiny")
  config.data = pathfinder.get_config().data
  # Balanced binary labels: the loss drops only by fitting the examples, so 16 of them, seen 8 times.
  tiny(config, pathfinder_dir, num_steps=16, resolution=32, as_tokens=as_tokens, num_train=16)
  if not as_tokens:
    config.model.patch_size = 4
    config.model.mixer_kwargs = {"head_dim": 8, "state_dim": 8}
  _assert_learns(config, tmp_path / "run", epoch=4)
