"""The grid, selection, fit and plot logic of the MQAR sweep, the LRA study and the scaling study."""
import math
import os

import numpy as np
import pytest

from experiments import lra
from experiments import scaling
from experiments import sweep
from experiments.trainer import config as trainer_config


def test_power_law_fit_recovers_known_parameters():
  compute = np.geomspace(1e10, 1e16, 9)
  a, b, c = 40.0, 0.12, 0.9
  loss = a * compute ** -b + c
  fa, fb, fc = scaling.fit_power_law(compute, loss)
  np.testing.assert_allclose([fa, fb, fc], [a, b, c], rtol=0.02)
  np.testing.assert_allclose(fa * compute ** -fb + fc, loss, rtol=1e-3)


def test_power_law_fit_needs_three_points():
  with pytest.raises(ValueError, match="compute"):
    scaling.fit_power_law([1e10, 1e11], [2.0, 1.5])


def test_frontier_takes_lowest_loss_per_budget_and_skips_nan():
  rows = [dict(mixer="gla", budget=1e10, loss=2.0, d_model=32, num_layers=1),
          dict(mixer="gla", budget=1e10, loss=1.5, d_model=64, num_layers=2),
          dict(mixer="gla", budget=1e11, loss=float("nan"), d_model=64, num_layers=2),
          dict(mixer="gla", budget=1e11, loss=1.4, d_model=32, num_layers=1)]
  assert scaling.frontier(rows) == {"gla": [(1e10, 1.5, 64, 2), (1e11, 1.4, 32, 1)]}


def test_steps_for_budget_spends_the_budget():
  steps = scaling.steps_for_budget(6e12, 1000, 2048)
  assert abs(6 * 1000 * 2048 * steps - 6e12) / 6e12 < 1e-3


def test_best_over_lr_picks_the_most_accurate_learning_rate_per_seed():
  rows = [dict(mixer="gla", d_model=32, seq_len=64, num_pairs=4, learning_rate=lr, accuracy=acc, seed=0)
          for lr, acc in ((1e-3, 0.2), (1e-2, float("nan")), (3e-3, 0.7))]
  rows.append(dict(mixer="gla", d_model=32, seq_len=64, num_pairs=4, learning_rate=1e-3, accuracy=0.5, seed=1))
  rows.append(dict(mixer="gla", d_model=64, seq_len=64, num_pairs=4, learning_rate=1e-2, accuracy=float("nan")))
  best = sweep.best_over_lr(rows)
  assert [(r["d_model"], r["seed"], r["learning_rate"], r["accuracy"]) for r in best] == [
      (32, 0, 3e-3, 0.7), (32, 1, 1e-3, 0.5), (64, 0, 1e-2, 0.0)]
  summary = sweep.over_seeds(best)
  assert [(r["d_model"], r["seeds"]) for r in summary] == [(32, 2), (64, 1)]
  assert summary[0]["accuracy"] == pytest.approx(0.6) and summary[0]["spread"] == pytest.approx(0.2)
  assert summary[0]["accuracies"] == "0.700 0.500" and summary[0]["learning_rates"] == "0.003 0.001"


def test_sweep_points_drop_pairs_that_do_not_fit():
  grid = dict(sweep.QUICK, mixers=("gla",), seq_lens=(64,), num_pairs=(4, 32), d_models=(32,),
              learning_rates=(1e-3, 1e-2), seeds=(0, 5))
  assert sweep.points(grid) == [("gla", 32, 64, 4, 1e-3, 0), ("gla", 32, 64, 4, 1e-2, 0), ("gla", 32, 64, 4, 1e-3, 5),
                                ("gla", 32, 64, 4, 1e-2, 5)]
  assert sweep.make_config(grid, *sweep.points(grid)[-1]).seed == 5


@pytest.mark.parametrize("grid", [sweep.QUICK, sweep.FULL], ids=["quick", "full"])
def test_sweep_configs_are_valid(grid):
  for point in sweep.points(grid)[:: len(grid["learning_rates"]) * len(grid["seeds"])]:
    config, _ = trainer_config.resolve(sweep.make_config(grid, *point))
    assert (config.model.mixer, config.model.d_model, config.data.num_pairs) == (point[0], point[1], point[3])


@pytest.mark.parametrize("grid", [lra.QUICK, lra.FULL], ids=["quick", "full"])
def test_lra_configs_are_valid(grid):
  for task in lra.TASKS:
    for mixer in grid["mixers"]:
      config, _ = trainer_config.resolve(lra.make_config(grid, task, mixer))
      assert config.model.kind == "classifier" and not config.model.causal
  two_d = lra.make_config(grid, "pathfinder", "lightnet")
  assert (two_d.model.positional, two_d.model.patch_size, two_d.data.as_tokens) == ("md_tpe", 1, False)


def test_scaling_counts_non_embedding_parameters():
  config = scaling.make_config(scaling.QUICK, "attention", 32, 1, 10)
  n = scaling.non_embedding_params(config)
  assert 0 < n < 32 * 32 * 20  # a 1-layer width-32 block, the 256 x 32 embedding excluded
  assert scaling.non_embedding_params(scaling.make_config(scaling.QUICK, "attention", 32, 2, 10)) > 1.9 * n


def test_plots_and_tables_are_written(tmp_path):
  best = [dict(mixer=m, d_model=d, seq_len=64, num_pairs=4, learning_rate=1e-3, accuracy=acc + 0.1 * seed, loss=1.0,
               seconds=1.0, seed=seed) for m, acc in (("attention", 0.8), ("gla", 0.5)) for d in (32, 64)
          for seed in (0, 1)]
  best = sweep.over_seeds(best)
  assert os.path.getsize(sweep.plot_accuracy_vs_width(best, str(tmp_path / "mqar.png"))) > 0
  assert open(sweep.write_table(best, str(tmp_path))).read().count("\n") == 5

  rows = [dict(mixer="gla", budget=c, loss=3.0 * c ** -0.1 + 0.5, d_model=32, num_layers=1) for c in (1e9, 1e10, 1e11)]
  fronts = scaling.frontier(rows)
  fits = scaling.fit_frontiers(fronts)
  assert math.isclose(fits["gla"]["b"], 0.1, rel_tol=0.05)
  assert os.path.getsize(scaling.plot_frontiers(rows, fronts, fits, str(tmp_path / "scaling.png"))) > 0

  lra_rows = [dict(mixer="hydra", task="listops", accuracy=0.3, seq_len=128)]
  table = lra.table_markdown(lra_rows)
  assert "| hydra | 30.0 (T=128) | not run | this repository |" in table
  assert "| Transformer | 36.37 (T=2K) | 71.40 (T=1K) | Tay et al. 2020 |" in table
  assert os.path.getsize(lra.plot_accuracy(lra_rows, str(tmp_path / "lra.png"))) > 0


def test_extended_sweep_runs_its_listed_shapes_at_every_width_seed_and_rate():
  pts = sweep.points(dict(sweep.EXTENDED, mixers=("gla",)))
  assert sorted({(t, p) for _, _, t, p, _, _ in pts}) == [(64, 4), (128, 8), (256, 16)]
  assert len(pts) == 3 * 2 * len(sweep.EXTENDED["learning_rates"]) * 3
  assert sweep.make_config(sweep.EXTENDED, *pts[-1]).data.seq_len == 256


def test_mqar_filler_is_zoology_figure2_in_the_config_and_noise_in_the_cpu_grids():
  from configs import mqar  # pylint: disable=import-outside-toplevel
  assert mqar.get_config("m2,small").data.random_non_queries is False
  point = ("m2", 64, 64, 4, 1e-2, 0)
  assert sweep.make_config(sweep.FULL, *point).data.random_non_queries is False
  for grid in (sweep.QUICK, sweep.EXTENDED):
    assert sweep.make_config(grid, *point).data.random_non_queries is True
