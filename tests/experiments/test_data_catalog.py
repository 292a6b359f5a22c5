"""Catalog datasets are read from a prepared data_dir; a missing one says how to prepare it."""
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import data

TEXTS = ["good film", "bad", "a very good film indeed", ""]


class TinyReviews(tfds.core.GeneratorBasedBuilder):
  """A four-review text classification set, shaped like imdb_reviews."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # no checksums file to look up beside this test

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "text": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=3),
        "image": tfds.features.Tensor(shape=(2, 2, 3), dtype=np.uint8)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(), "test": self._generate_examples()}

  def _generate_examples(self):
    for i, t in enumerate(TEXTS):
      yield i, {"text": t, "label": i % 3, "image": np.full((2, 2, 3), 10 * i, np.uint8)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("catalog"))
  TinyReviews(data_dir=root).download_and_prepare(file_format="array_record")
  return root


def _config(data_dir, **fields):
  return ml_collections.ConfigDict(dict(name="tfds:tiny_reviews", data_dir=data_dir, **fields))


def test_text_classification(data_dir):
  config = _config(data_dir, kind="text_classification", seq_len=8)
  spec = data.dataset_spec(config)
  assert (spec.task, spec.num_classes, spec.splits, spec.eval_split) == ("classification", 3, ("test", "train"),
                                                                        "test")
  batches = list(data.get_dataset(config, "test", seed=0, batch_size=4))
  assert len(batches) == 1
  b = batches[0]
  rows = []
  for ids, mask, label in zip(b["inputs"], b["mask"], b["label"]):
    n = int(mask.sum())
    assert mask.tolist() == [True] * n + [False] * (8 - n) and not ids[n:].any()
    rows.append((bytes(ids[:n].astype(np.uint8)), int(label)))
  assert sorted(rows) == sorted((t.encode()[:8], i % 3) for i, t in enumerate(TEXTS))  # files keep TFDS's order


def test_text_lm_and_image_kinds(data_dir):
  lm = next(data.get_dataset(_config(data_dir, kind="lm", seq_len=4), "test", seed=0, batch_size=4))
  rows = {bytes(x[m].astype(np.uint8)): (y.tolist(), m.tolist()) for x, y, m in zip(lm["inputs"], lm["targets"],
                                                                                    lm["mask"])}
  assert rows[b"good"] == (list(b"ood "), [True] * 4)
  assert rows[b"a ve"] == (list(b" ver"), [True] * 4)
  assert rows[b"ba"] == (list(b"ad") + [-100, -100], [True, True, False, False])
  assert rows[b""] == ([-100] * 4, [False] * 4)
  image = next(data.get_dataset(_config(data_dir, kind="image_classification"), "test", seed=0, batch_size=4))
  assert image["image"].shape == (4, 2, 2, 3)
  assert sorted(image["image"][:, 0, 0, 0].tolist()) == [0, 10, 20, 30]
  tokens = next(data.get_dataset(_config(data_dir, kind="image_classification", as_tokens=True), "test", seed=0,
                                 batch_size=4))
  assert tokens["inputs"].shape == (4, 4)
  np.testing.assert_array_equal(tokens["inputs"], np.repeat(image["image"][:, :1, :1, 0].reshape(4, 1), 4, 1))


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  config = ml_collections.ConfigDict(dict(name="imdb_reviews", data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match=f"tfds build imdb_reviews --data_dir {tmp_path} --file_format array_record"):
    data.get_dataset(config, "train", seed=0, batch_size=2)
  with pytest.raises(ValueError, match="kind"):
    data.dataset_spec(_config(str(tmp_path), kind="video"))
