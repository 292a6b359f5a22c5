"""State tracking: the group tables are groups, the targets are running products, the config and study run."""
import itertools

import numpy as np
import pytest

from configs import state_tracking as config_module
from experiments import data
from experiments import state_tracking as study
from experiments.data import state_tracking
from experiments.trainer import config as trainer_config


@pytest.mark.parametrize("group,order", [("parity", 2), ("s3", 6), ("s5", 120)])
def test_tables_are_groups(group, order):
  table = state_tracking.multiplication_table(group)
  assert table.shape == (order, order)
  idx = np.arange(order)
  assert (table[0] == idx).all() and (table[:, 0] == idx).all()  # 0 is the identity
  assert all(sorted(row) == list(idx) for row in table)  # a Latin square: every element has an inverse
  a, b, c = np.random.default_rng(0).integers(0, order, (3, 200))
  assert (table[table[a, b], c] == table[a, table[b, c]]).all()  # associative


def test_s3_table_composes_permutations():
  perms = list(itertools.permutations(range(3)))
  for i, p in enumerate(perms):
    for j, q in enumerate(perms):
      applied = np.array(p)[np.array(q)]  # q first, then p
      assert perms[state_tracking.multiplication_table("s3")[i, j]] == tuple(applied)


def test_targets_are_running_products():
  rng = np.random.default_rng(1)
  ex = state_tracking.state_tracking_example(rng, group="parity", seq_len=37)
  np.testing.assert_array_equal(ex["targets"], np.cumsum(ex["inputs"]) % 2)
  ex = state_tracking.state_tracking_example(rng, group="s5", seq_len=23)
  perms = list(itertools.permutations(range(5)))
  state = np.arange(5)
  for g, target in zip(ex["inputs"], ex["targets"]):
    state = np.array(perms[g])[state]
    assert perms[target] == tuple(state)
  assert ex["inputs"].dtype == ex["targets"].dtype == np.int32


def test_dataset_batches_and_spec(tmp_path):
  cfg = dict(name="state_tracking", group="s3", seq_len=12, num_train=16, num_validation=8, num_test=0,
             data_dir=str(tmp_path))
  spec = data.dataset_spec(cfg)
  assert (spec.task, spec.vocab_size, spec.seq_len) == ("lm", 6, 12)
  batch = next(data.get_dataset(cfg, "train", seed=0, batch_size=4))
  assert batch["inputs"].shape == batch["targets"].shape == (4, 12) and batch["mask"].all()
  table = state_tracking.multiplication_table("s3")
  np.testing.assert_array_equal(batch["targets"][:, 1], table[batch["inputs"][:, 1], batch["inputs"][:, 0]])


def test_bad_group_names_the_valid_ones():
  with pytest.raises(ValueError, match="config.data.group='s4'.*parity"):
    data.dataset_spec(dict(name="state_tracking", group="s4"))


def test_config_resolves_with_negative_eigenvalues_by_default(tmp_path):
  config = config_module.get_config("delta_net,tiny")
  config.data.data_dir = str(tmp_path)
  resolved, spec = trainer_config.resolve(config)
  assert resolved.model.causal and spec.vocab_size == 2
  assert resolved.model.per_mixer_kwargs.delta_net.allow_neg_eigval
  grid = dict(study.QUICK, num_steps=2)
  positive = study.make_config(grid, "delta_net[0,1]", "s3", 1)
  assert not positive.model.per_mixer_kwargs.delta_net.allow_neg_eigval and positive.seed == 1
  assert positive.data.group == "s3" and positive.num_steps == 2


def test_summary_gives_mean_and_spread_per_variant(tmp_path):
  rows = [dict(variant="gla", group="parity", accuracy=a) for a in (0.5, 0.7)]
  rows += [dict(variant="delta_net[-1,1]", group="parity", accuracy=float("nan"))]
  grid = dict(mixers=("delta_net[-1,1]", "gla"), groups=("parity",))
  summary = study.summarize(rows, grid)
  assert [(v, g) for v, g, *_ in summary] == [("delta_net[-1,1]", "parity"), ("gla", "parity")]
  assert summary[0][2] == 0.0  # a diverged run scores 0
  assert summary[1][2] == pytest.approx(0.6) and summary[1][3] == pytest.approx(0.2)
  path = study.write_table(summary, str(tmp_path))
  assert open(path).read().splitlines()[2].startswith("gla,parity,0.6000,0.2000")
