"""Evaluation and generation from a checkpoint; plots of a workdir."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from configs import lm
from experiments import evaluate, generate, plots
from experiments.trainer import loop, restore
from tests.experiments.test_train import make_text_dir, tiny


def test_evaluate_generate_and_plot_a_checkpoint(tmp_path):
  config = tiny(lm.get_config("retention,tiny"), tmp_path / "data", num_steps=4,
                corpus=make_text_dir(tmp_path / "text"), seq_len=32)
  config.eval_steps = 2
  workdir = str(tmp_path / "run")
  trained = loop.train_and_evaluate(config, workdir)

  result = evaluate.evaluate_run(workdir)
  assert result["step"] == 4 and result["split"] == trained["split"]
  np.testing.assert_allclose(result["loss"], trained["loss"], rtol=1e-5)

  exp, state, step = restore.load_run(workdir)
  prompt = np.frombuffer(b"def f1(", np.uint8).astype(np.int32)[None].repeat(2, 0)
  tokens, per_token = generate.generate(exp.model, state["params"], prompt, 6, rng=jax.random.key(0),
                                        temperature=0.0)
  # Greedy decoding through the cache picks the argmax of the full forward pass at every position.
  full = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
  logits = exp.model.apply({"params": state["params"]}, full)
  assert tokens.shape == (2, 6) and per_token > 0
  np.testing.assert_array_equal(tokens, np.argmax(logits[:, prompt.shape[1] - 1:], -1))

  paths = plots.write_plots(workdir)
  assert os.path.basename(paths[0]) == "curves.png"
  assert all(os.path.getsize(p) > 1000 for p in paths)
  assert any(p.endswith("loss.png") for p in paths)
