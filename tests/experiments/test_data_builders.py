"""The generated datasets mean what their docstrings say, and depend only on their seed."""
import collections
import statistics

import numpy as np
import pytest

from experiments.data import listops
from experiments.data import mqar
from experiments.data import pathfinder
from experiments.data import synthetic

V, T, P = 64, 40, 5


def _examples(builder_cls, data_dir, split="train", **fields):
  builder = synthetic.prepare(builder_cls, str(data_dir), **fields)
  source = synthetic.data_source(builder, split)
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def mqar_train(tmp_path_factory):
  return _examples(mqar.Mqar, tmp_path_factory.mktemp("mqar"), vocab_size=V, seq_len=T, num_pairs=P,
                   num_train=40, num_validation=4, num_test=0)


def test_mqar_layout_and_answers(mqar_train):
  assert len(mqar_train) == 40
  for ex in mqar_train:
    x, y = ex["inputs"], ex["targets"]
    assert x.shape == y.shape == (T,) and x.dtype == y.dtype == np.int32
    keys, values = x[0:2 * P:2], x[1:2 * P:2]
    assert np.all((1 <= keys) & (keys < V // 2)) and len(set(keys)) == P
    assert np.all((V // 2 <= values) & (values < V)) and len(set(values)) == P
    assert np.all((0 <= x) & (x < V))
    answer = dict(zip(keys.tolist(), values.tolist()))
    queries = np.flatnonzero(y != mqar.IGNORE_INDEX)
    assert np.all(queries >= 2 * P) and np.all((queries - 2 * P) % 2 == 0)
    assert sorted(x[queries].tolist()) == sorted(keys.tolist())  # each key queried exactly once
    assert [answer[k] for k in x[queries].tolist()] == y[queries].tolist()
    assert np.all(y[np.setdiff1d(np.arange(T), queries)] == -100)


def test_mqar_power_law_placement():
  slots = []
  for i in range(200):
    ex = mqar.mqar_example(np.random.default_rng(i), vocab_size=512, seq_len=256, num_pairs=4,
                           random_non_queries=False)
    q = np.flatnonzero(ex["targets"] != -100)
    slots.extend(((q - 8) // 2).tolist())
    filler = np.setdiff1d(np.arange(8, 256), q)
    assert np.all(ex["inputs"][filler] == 0)
  # p(g) ~ (g+1)^-0.99 puts ~3/4 of the draws in the first quarter of the 124 slots (uniform: 1/4).
  assert np.mean(np.array(slots) < 31) > 0.6


def test_mqar_rejects_impossible_sizes():
  with pytest.raises(ValueError, match="num_pairs"):
    mqar.mqar_example(np.random.default_rng(0), vocab_size=64, seq_len=16, num_pairs=5)
  with pytest.raises(ValueError, match="vocab_size"):
    mqar.mqar_example(np.random.default_rng(0), vocab_size=8, seq_len=64, num_pairs=4)


def test_generation_is_deterministic_for_a_seed(tmp_path, mqar_train):
  sizes = dict(vocab_size=V, seq_len=T, num_pairs=P, num_train=40, num_validation=4, num_test=0)
  again = _examples(mqar.Mqar, tmp_path / "a", **sizes)
  other = _examples(mqar.Mqar, tmp_path / "b", seed=1, **sizes)
  for a, b in zip(mqar_train, again):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["targets"], b["targets"])
  assert any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(mqar_train, other))
  validation = _examples(mqar.Mqar, tmp_path / "a", split="validation", **sizes)
  assert not any(np.array_equal(v["inputs"], t["inputs"]) for v in validation for t in mqar_train)


def _evaluate_listops(tokens):
  """Stack evaluation of a token string, independent of the generator's tree."""
  stack = [[]]
  for tok in tokens:
    if tok.startswith("["):
      stack.append([tok])
    elif tok == "]":
      op, *args = stack.pop()
      value = {"[MIN": min, "[MAX": max, "[SM": lambda a: sum(a) % 10,
               "[MED": lambda a: int(statistics.median(a) // 1)}[op](args)
      stack[-1].append(value)
    else:
      stack[-1].append(int(tok))
  assert len(stack) == 1 and len(stack[0]) == 1
  return stack[0][0]


def _depth_and_args(tokens):
  depth = max_depth = 0
  counts, max_args = [], 0
  for tok in tokens:
    if counts and tok != "]":
      counts[-1] += 1
    if tok.startswith("["):
      depth += 1
      max_depth = max(max_depth, depth)
      counts.append(0)
    elif tok == "]":
      depth -= 1
      max_args = max(max_args, counts.pop())
  return max_depth, max_args


def test_listops_labels_equal_evaluation(tmp_path):
  examples = _examples(listops.Listops, tmp_path, min_length=20, max_length=120, max_depth=5, max_args=4,
                       num_train=60, num_validation=0, num_test=0)
  labels = collections.Counter()
  for ex in examples:
    ids = ex["tokens"]
    assert ids.dtype == np.uint8 and 20 < len(ids) < 120 and np.all(ids > 0)
    tokens = [listops.VOCAB[i] for i in ids]
    assert _evaluate_listops(tokens) == ex["label"]
    depth, args = _depth_and_args(tokens)
    assert depth <= 4 and 2 <= args <= 4  # below max_depth=5 nodes may branch, so lists nest <= 4 deep
    labels[int(ex["label"])] += 1
  assert len(labels) >= 5


def _connected(image, start, goal, bridge):
  """Flood fill over bright pixels with steps of Chebyshev length <= bridge."""
  bright = image[..., 0] > 127
  h, w = bright.shape
  seen = np.zeros_like(bright)
  todo = [tuple(start)]
  seen[tuple(start)] = True
  while todo:
    y, x = todo.pop()
    if (y, x) == tuple(goal):
      return True
    for dy in range(-bridge, bridge + 1):
      for dx in range(-bridge, bridge + 1):
        v, u = y + dy, x + dx
        if 0 <= v < h and 0 <= u < w and bright[v, u] and not seen[v, u]:
          seen[v, u] = True
          todo.append((v, u))
  return False


def _check_pathfinder(ex, resolution):
  image, label, markers = ex["image"], int(ex["label"]), ex["markers"]
  assert image.shape == (resolution, resolution, 1) and image.dtype == np.uint8
  assert set(np.unique(image)) <= {0, 255}
  assert image[markers[0][0], markers[0][1], 0] == image[markers[1][0], markers[1][1], 0] == 255
  assert _connected(image, markers[0], markers[1], pathfinder.BRIDGE) == bool(label)
  return label


def test_pathfinder_positives_connect_the_markers(tmp_path):
  examples = _examples(pathfinder.Pathfinder, tmp_path, resolution=32, num_distractors=2, num_train=40,
                       num_validation=0, num_test=0)
  labels = [_check_pathfinder(ex, 32) for ex in examples]
  assert 10 <= sum(labels) <= 30


def test_pathfinder_contours_are_dashed():
  line = np.stack([np.full(81, 5.0), np.arange(81) * 0.25], axis=-1)  # 20 pixels of arc, horizontal
  cols = set(pathfinder._dash_pixels(line, dash=2)[:, 1].tolist())
  missing = sorted(set(range(21)) - cols)
  assert len(missing) >= 4 and np.all(np.diff(missing) > 1)  # gaps of one pixel, bridged by BRIDGE = 2


def test_pathfinder_64_renders_both_labels():
  for i in range(6):
    ex = pathfinder.render(np.random.default_rng(i), resolution=64, label=i % 2, num_distractors=8)
    assert _check_pathfinder(ex, 64) == i % 2


def test_pathfinder_without_room_raises_instead_of_looping(monkeypatch):
  monkeypatch.setattr(pathfinder, "_MAX_IMAGES", 3)
  with pytest.raises(ValueError, match="resolution=16, num_distractors=40: found no room"):
    pathfinder.render(np.random.default_rng(0), resolution=16, label=1, num_distractors=40)


def test_builder_config_rejects_unknown_fields():
  with pytest.raises(ValueError, match="num_keys"):
    mqar.Mqar.make_config(num_keys=3)
