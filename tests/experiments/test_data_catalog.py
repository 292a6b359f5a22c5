"""Catalog datasets are read from a prepared data_dir; a missing one says how to prepare it; texts of kind lm are
packed into rows with segment ids, laid out from their cached lengths."""
import os
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import base as data_sources

from experiments import data
from experiments.data import catalog
from experiments.trainer import step as step_lib

TEXTS = ["good film", "bad", "a very good film indeed", ""]
T = 16
# Empty, one byte, multi-byte UTF-8, exactly one full window (T+1 bytes), several windows.
LM_TEXTS = ["", "a", "hi", "the cat sat", "a longer sentence that runs across three rows of seventeen bytes",
            "h\u00e9llo w\u00f6rld", "x" * (T + 1), "short one", "sixteen bytes!!!", "q" * (2 * T + 1),
            "mid length text.", "tail"]


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


class TinyTexts(tfds.core.GeneratorBasedBuilder):
  """A dozen texts of varied lengths for language modelling, shaped like lm1b."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, t in enumerate(LM_TEXTS):
      yield i, {"text": t}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("catalog"))
  TinyReviews(data_dir=root).download_and_prepare(file_format="array_record")
  TinyTexts(data_dir=root).download_and_prepare(file_format="array_record")
  return root


def _config(data_dir, **fields):
  return ml_collections.ConfigDict(dict(name="tfds:tiny_reviews", data_dir=data_dir, **fields))


def _lm_config(data_dir, **fields):
  return ml_collections.ConfigDict(dict(name="tfds:tiny_texts", data_dir=data_dir, kind="lm", seq_len=T, **fields))


def _packed(data_dir):
  """The packed train split, built afresh (no cached lengths, nothing in memory)."""
  shutil.rmtree(os.path.join(data_dir, catalog.CACHE), ignore_errors=True)
  catalog.packed_texts.cache_clear()
  return catalog.packed_texts("tiny_texts", data_dir, "train", T, "text")


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
  lm = next(data.get_dataset(_config(data_dir, kind="lm", seq_len=4, packing=False), "test", seed=0, batch_size=4))
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


def _segments(ex):
  """{segment id: (first position, the segment's tokens)} of a batch row: its inputs, then its last target when
  that is scored (the row's last token)."""
  out = {}
  for s in np.unique(ex["segment_ids"][ex["segment_ids"] > 0]):
    at = np.flatnonzero(ex["segment_ids"] == s)
    last = [ex["targets"][at[-1]]] if ex["targets"][at[-1]] != data.IGNORE_INDEX else []
    out[int(s)] = (int(at[0]), ex["inputs"][at].tolist() + last)
  return out


def test_packed_rows_hold_every_text_once_and_predict_nothing_across_texts(data_dir):
  packed = _packed(data_dir)
  layout = packed.plan
  config = _lm_config(data_dir)
  batches = list(data.get_dataset(config, "train", seed=0, batch_size=4, shuffle=False, num_epochs=1))
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  assert rows["segment_ids"].shape == rows["inputs"].shape == (4 * len(batches), T)
  assert not rows["mask"][len(layout):].any() and rows["valid"].tolist() == [True] * len(layout) + [False] * (
      4 * len(batches) - len(layout))
  texts = [bytes(catalog.text_bytes(ex["text"])) for ex in catalog.data_source("tiny_texts", data_dir, "train")]
  assert sorted(texts) == sorted(t.encode() for t in LM_TEXTS)  # in the files' order, TFDS's own
  windows = {}  # text index -> {start: window tokens}
  for r in range(len(layout)):
    ex = {k: v[r] for k, v in rows.items()}
    np.testing.assert_array_equal(ex["mask"], ex["segment_ids"] > 0)
    for s, (first, tokens) in _segments(ex).items():
      p = layout.row_starts[r] + s - 1
      doc, start = int(layout.document[p]), int(layout.start[p])
      windows.setdefault(doc, {})[start] = tokens
      for t in np.flatnonzero((ex["segment_ids"] == s) & (ex["targets"] != data.IGNORE_INDEX)):
        assert ex["targets"][t] == texts[doc][start + t - first + 1]  # the next byte of its own text
  for i, text in enumerate(texts):
    if len(text) < 2:
      assert i not in windows  # nothing to predict
      continue
    starts = sorted(windows[i])
    assert starts == list(range(0, len(text) - 1, T))
    assert bytes(sum((windows[i][a][1 if a else 0:] for a in starts), [])) == text
  scored = sum(int((b["targets"] != data.IGNORE_INDEX).sum()) for b in batches)
  assert scored == sum(max(len(t) - 1, 0) for t in texts)
  x, kwargs = step_lib.model_inputs(batches[0])
  assert x is batches[0]["inputs"] and kwargs["segment_ids"] is batches[0]["segment_ids"]
  assert data.num_examples(config, "train") == len(layout)


def test_packing_prints_its_efficiency_above_one_text_a_row(data_dir, capsys):
  packed = _packed(data_dir)
  assert f"into {len(packed)} rows of {T + 1} bytes: {100 * packed.efficiency:.2f}% real tokens" in (
      capsys.readouterr().out)

  def real_fraction(**fields):
    batches = data.get_dataset(_lm_config(data_dir, **fields), "train", seed=0, batch_size=1, num_epochs=1)
    return np.mean([b["mask"] for b in batches])

  assert real_fraction() > 1.5 * real_fraction(packing=False)


def test_lengths_are_measured_once_and_rows_read_only_their_texts(data_dir, monkeypatch):
  reads = []
  read_items = data_sources.BaseDataSource.__getitems__
  monkeypatch.setattr(data_sources.BaseDataSource, "__getitems__", lambda self, keys: (
      reads.extend(keys), read_items(self, keys))[1])
  first = _packed(data_dir).plan
  assert sorted(reads) == list(range(len(LM_TEXTS)))
  cached = sorted(os.listdir(os.path.join(data_dir, catalog.CACHE, "tiny_texts", "1.0.0")))
  assert cached == ["train.text.lengths.npy", f"train.text.plan{T}.npz"]
  reads.clear()
  catalog.packed_texts.cache_clear()
  monkeypatch.setattr(catalog.packing, "plan", None)  # the layout is read back too
  packed = catalog.packed_texts("tiny_texts", data_dir, "train", T, "text")
  assert reads == []
  for name in ("document", "start", "length", "row_starts"):
    np.testing.assert_array_equal(getattr(packed.plan, name), getattr(first, name))
  row = int(np.argmax(np.diff(packed.plan.row_starts)))  # the row holding the most texts
  packed[row]
  assert reads == packed.plan.documents(row).tolist() and len(reads) > 1


def test_packing_must_be_a_bool_and_applies_to_lm_texts_only(data_dir):
  with pytest.raises(ValueError, match="config.data.packing='yes': expected True or False"):
    data.dataset_spec(_lm_config(data_dir, packing="yes"))
  with pytest.raises(ValueError, match="packing"):
    data.dataset_spec(ml_collections.ConfigDict(dict(name="lm1b", data_dir=data_dir, packing=1)))
  assert data.data_config.resolve(_config(data_dir, kind="text_classification")).packing is False
  assert data.data_config.resolve(ml_collections.ConfigDict(dict(name="lm1b"))).packing is True
