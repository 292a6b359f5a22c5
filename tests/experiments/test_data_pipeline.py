"""Order, resumption, sharding and padding of the batches, through grain and `get_dataset`."""
import itertools

import ml_collections
import numpy as np
import pytest

from experiments import data
from experiments.data import pipeline
from experiments.data import text

SOURCE = [{"x": np.int32(i), "targets": np.full(3, i, np.int32)} for i in range(10)]


def _take(it, n):
  return [b for b in itertools.islice(it, n)]


def _ids(batches):
  return [b["x"].tolist() for b in batches]


def test_epochs_are_seeded_permutations():
  stream = sum(_ids(_take(pipeline.batches(SOURCE, batch_size=5, seed=3), 6)), [])
  epochs = [stream[i:i + 10] for i in range(0, 30, 10)]
  assert all(sorted(e) == list(range(10)) for e in epochs)
  assert epochs[0] != epochs[1] and epochs[0] != list(range(10))
  assert stream == sum(_ids(_take(pipeline.batches(SOURCE, batch_size=5, seed=3), 6)), [])
  assert stream != sum(_ids(_take(pipeline.batches(SOURCE, batch_size=5, seed=4), 6)), [])


def test_resume_from_a_step_gives_the_same_batches():
  full = _take(pipeline.batches(SOURCE, batch_size=4, seed=0), 9)  # crosses three epoch boundaries
  for step in (1, 2, 5):
    resumed = _take(pipeline.batches(SOURCE, batch_size=4, seed=0, start_step=step), 9 - step)
    assert _ids(resumed) == _ids(full[step:])


def test_hosts_partition_each_global_batch():
  whole = _ids(_take(pipeline.batches(SOURCE, batch_size=6, seed=1), 4))
  hosts = [_ids(_take(pipeline.batches(SOURCE, batch_size=6, seed=1, process_index=p, process_count=3), 4))
           for p in range(3)]
  for step in range(4):
    assert sum((h[step] for h in hosts), []) == whole[step]
  resumed = _ids(_take(pipeline.batches(SOURCE, batch_size=6, seed=1, process_index=2, process_count=3,
                                        start_step=3), 1))
  assert resumed == hosts[2][3:]


def test_finite_stream_pads_the_last_batch():
  batches = list(pipeline.batches(SOURCE, batch_size=4, seed=0, shuffle=False, num_epochs=1))
  assert len(batches) == pipeline.num_batches(10, batch_size=4) == 3
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.tolist() == [True] * 10 + [False] * 2
  assert np.concatenate([b["x"] for b in batches])[:10].tolist() == list(range(10))
  assert np.all(batches[-1]["targets"][2:] == data.IGNORE_INDEX)
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.batches(SOURCE, batch_size=5, seed=0, process_count=2)


@pytest.fixture(scope="module")
def mqar_config(tmp_path_factory):
  return ml_collections.ConfigDict(dict(name="mqar", data_dir=str(tmp_path_factory.mktemp("data")), vocab_size=64,
                                        seq_len=32, num_pairs=4, num_train=24, num_validation=10, num_test=0))


def test_get_dataset_mqar_batches(mqar_config):
  spec = data.dataset_spec(mqar_config)
  assert (spec.task, spec.vocab_size, spec.seq_len) == ("lm", 64, 32)
  assert data.num_examples(mqar_config, "train") == 24
  it = data.get_dataset(mqar_config, "train", seed=0, batch_size=8)
  batches = _take(it, 5)
  b = batches[0]
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
      "inputs": ((8, 32), np.int32), "targets": ((8, 32), np.int32), "mask": ((8, 32), bool), "valid": ((8,), bool)}
  assert np.all((b["targets"] != -100).sum(1) == 4)
  resumed = _take(data.get_dataset(mqar_config, "train", seed=0, batch_size=8, start_step=3), 2)
  for x, y in zip(batches[3:], resumed):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  host1 = _take(data.get_dataset(mqar_config, "train", seed=0, batch_size=8, process_index=1, process_count=2), 5)
  for x, y in zip(batches, host1):
    np.testing.assert_array_equal(x["targets"][4:], y["targets"])
  evaluation = list(data.get_dataset(mqar_config, "validation", seed=0, batch_size=4))
  assert len(evaluation) == 3 and sum(int(b["valid"].sum()) for b in evaluation) == 10


def test_config_errors_name_the_valid_choices(mqar_config):
  with pytest.raises(ValueError, match="'mqar'.*'listops'.*'pathfinder'.*'bytes'"):
    data.get_dataset(ml_collections.ConfigDict(dict(name="mqa")), "train", seed=0, batch_size=2)
  bad = ml_collections.ConfigDict(dict(mqar_config))
  bad.num_keys = 3
  with pytest.raises(ValueError, match="num_keys.*valid fields.*num_pairs"):
    data.num_examples(bad, "train")
  with pytest.raises(ValueError, match="max_length"):
    data.dataset_spec(ml_collections.ConfigDict(dict(name="listops", seq_len=100)))
  with pytest.raises(ValueError, match="split='test'"):
    data.num_examples(mqar_config, "test")


def test_byte_corpus_windows(tmp_path):
  """Unpacked (packing=False): windows of the concatenated corpus, across files."""
  (tmp_path / "b.txt").write_bytes(bytes(range(100, 140)))
  (tmp_path / "a.txt").write_bytes(bytes(range(40)))
  config = ml_collections.ConfigDict(dict(name="bytes", corpus=str(tmp_path), corpus_glob="*.txt", seq_len=7,
                                          validation_fraction=0.25, packing=False))
  corpus = list(range(40)) + [10] + list(range(100, 140)) + [10]  # sorted order, newline after each file
  cut = int(len(corpus) * 0.75)
  assert data.num_examples(config, "train") == (cut - 1) // 7
  batch = next(data.get_dataset(config, "train", seed=0, batch_size=2, shuffle=False))
  np.testing.assert_array_equal(batch["inputs"][1], corpus[7:14])
  np.testing.assert_array_equal(batch["targets"][1], corpus[8:15])
  val = next(data.get_dataset(config, "validation", seed=0, batch_size=1))
  np.testing.assert_array_equal(val["inputs"][0], corpus[cut:cut + 7])


def test_default_corpus_is_the_standard_library():
  files = text.corpus_files(text.default_corpus())
  names = {f.name for f in files}
  assert {"os.py", "random.py"} <= names and files == sorted(files)
  assert not any("site-packages" in f.parts for f in files)
