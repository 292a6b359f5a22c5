"""Datasets of the experiments: one entry point from `config.data` to batches of numpy arrays.

    from experiments import data
    spec = data.dataset_spec(config.data)          # task, vocab_size, num_classes, shapes, splits
    it = data.get_dataset(config.data, "train", seed=0, batch_size=64, start_step=step)
    batch = next(it)

Names: `mqar`, `listops`, `pathfinder`, `state_tracking` (generated here as TFDS datasets and cached in
`data_dir`), `bytes` (byte-level LM over local text), catalog datasets prepared in `data_dir`
(`lm1b`, `imdb_reviews`, `cifar10`, `cifar100`, `mnist`, `fashion_mnist`) and any other as
`tfds:NAME` with `config.data.kind`. Fields of `config.data`: see `data_config`.

Batch keys (B = batch_size / process_count, T = config.data.seq_len):
  task "lm" (mqar, state_tracking, bytes, lm1b):
    inputs  [B, T] int32   tokens read so far
    targets [B, T] int32   next token to predict; IGNORE_INDEX (-100) where nothing is scored
                           (MQAR: everywhere but the query positions; text: padding;
                           state_tracking scores every position)
    mask    [B, T] bool    real (non-padding) input tokens
    segment_ids [B, T] int32  only with `data.packing` (bytes, lm1b, tfds:NAME of kind lm): the documents'
                           windows packed in a row, numbered from 1; 0 is padding
  task "classification", token inputs (listops, imdb_reviews, images with as_tokens=True):
    inputs  [B, T] int32   tokens, 0-padded (images: grayscale pixels 0..255, T = H*W)
    mask    [B, T] bool    real tokens
    label   [B]    int32
  task "classification", image inputs (pathfinder, cifar10, ... with as_tokens=False):
    image   [B, H, W, C] uint8
    label   [B]    int32
  every batch:
    valid   [B]    bool    False only for the padding examples that complete the last batch
                           of a finite (evaluation) stream
"""
import dataclasses

import numpy as np

from experiments.data import catalog
from experiments.data import data_config
from experiments.data import listops
from experiments.data import mqar
from experiments.data import pathfinder
from experiments.data import pipeline
from experiments.data import state_tracking
from experiments.data import synthetic
from experiments.data import text
from experiments.data.targets import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a model needs to know about a dataset.

  task: "lm" (causal next-token loss on `targets`) or "classification" (`label`);
  inputs: "tokens" (`inputs` [T] int32 < vocab_size) or "image" (`image` [H, W, C] uint8).
  """
  name: str
  task: str
  inputs: str
  vocab_size: int | None
  num_classes: int | None
  seq_len: int | None
  image_shape: tuple | None
  splits: tuple
  eval_split: str


def dataset_spec(config):
  """DatasetSpec of `config` (prepares a synthetic dataset, reads a catalog dataset's info)."""
  c = data_config.resolved(config)
  splits = ("train", "validation", "test")
  if c.name == "mqar":
    return DatasetSpec(c.name, "lm", "tokens", c.vocab_size, None, c.seq_len, None, splits, "validation")
  if c.name == "state_tracking":
    return DatasetSpec(c.name, "lm", "tokens", state_tracking.group_order(c.group), None, c.seq_len, None, splits,
                       "validation")
  if c.name == "listops":
    return DatasetSpec(c.name, "classification", "tokens", len(listops.VOCAB), listops.NUM_CLASSES, c.seq_len,
                       None, splits, "validation")
  if c.name == "pathfinder":
    return _image_spec(c, (c.resolution, c.resolution, 1), 2, splits, "validation")
  if c.name == "bytes":
    return DatasetSpec(c.name, "lm", "tokens", text.VOCAB_SIZE, None, c.seq_len, None, ("train", "validation"),
                       "validation")
  name, kind, keys = _catalog_entry(c)
  info = catalog.load_builder(name, c.data_dir).info
  splits = tuple(sorted(info.splits))
  eval_split = "validation" if "validation" in splits else "test"
  if kind == "lm":
    return DatasetSpec(c.name, "lm", "tokens", text.VOCAB_SIZE, None, c.seq_len, None, splits, eval_split)
  num_classes = info.features[keys["label"]].num_classes
  if kind == "text_classification":
    return DatasetSpec(c.name, "classification", "tokens", text.VOCAB_SIZE, num_classes, c.seq_len, None, splits,
                       eval_split)
  return _image_spec(c, tuple(info.features[keys["image"]].shape), num_classes, splits, eval_split)


def num_examples(config, split):
  """Examples in `split` (before padding or repetition)."""
  source, _ = _source(data_config.resolved(config), split)
  return len(source)


def get_dataset(config, split, *, seed, batch_size, process_index=0, process_count=1, start_step=0,
                shuffle=None, num_epochs=None):
  """Iterator over this host's batches of `split` (keys and shapes: module docstring).

  batch_size is the global batch; each of process_count hosts gets its own batch_size /
  process_count rows of every global batch. Defaults: the "train" split is shuffled and
  repeated forever, any other split is read once in order (num_epochs=1), its last batch
  padded with invalid examples. start_step skips that many batches: the iterator yields
  exactly what an uninterrupted iterator yields from that step on.
  """
  c = data_config.resolved(config)
  is_train = split == "train"
  shuffle = is_train if shuffle is None else shuffle
  num_epochs = (None if is_train else 1) if num_epochs is None else num_epochs
  source, transform = _source(c, split)
  return pipeline.batches(source, batch_size=batch_size, seed=seed, transform=transform, shuffle=shuffle,
                          num_epochs=num_epochs, start_step=start_step, process_index=process_index,
                          process_count=process_count)


def prepare(config):
  """Generates a synthetic dataset into data_dir now (no-op for the others); returns the builder or None."""
  c = data_config.resolved(config)
  return _synthetic_builder(c) if c.name in data_config.SYNTHETIC else None


def _synthetic_builder(c):
  common = dict(seed=c.seed, num_train=c.num_train, num_validation=c.num_validation, num_test=c.num_test)
  if c.name == "mqar":
    return synthetic.prepare(mqar.Mqar, c.data_dir, vocab_size=c.vocab_size, seq_len=c.seq_len,
                             num_pairs=c.num_pairs, power_a=c.power_a, random_non_queries=c.random_non_queries,
                             **common)
  if c.name == "listops":
    return synthetic.prepare(listops.Listops, c.data_dir, min_length=c.min_length, max_length=c.max_length,
                             max_depth=c.max_depth, max_args=c.max_args, **common)
  if c.name == "state_tracking":
    return synthetic.prepare(state_tracking.StateTracking, c.data_dir, group=c.group, seq_len=c.seq_len, **common)
  return synthetic.prepare(pathfinder.Pathfinder, c.data_dir, resolution=c.resolution,
                           num_distractors=c.num_distractors, **common)


def _source(c, split):
  """(random-access source, per-example transform to the batch keys) of a resolved config."""
  if c.name in data_config.SYNTHETIC:
    builder = _synthetic_builder(c)
    if split not in builder.info.splits:
      raise ValueError(f"split={split!r}: {c.name} has splits {sorted(builder.info.splits)} with these sizes")
    source = synthetic.data_source(builder, split)
    if c.name in ("mqar", "state_tracking"):
      return source, _with_full_mask
    if c.name == "listops":
      return source, lambda ex: _token_classification(ex["tokens"], ex["label"], c.seq_len)
    return source, lambda ex: _image_classification(ex["image"], ex["label"], c.as_tokens)
  if c.name == "bytes":
    return text.byte_source(split, seq_len=c.seq_len, corpus=c.corpus, corpus_glob=c.corpus_glob,
                            validation_fraction=c.validation_fraction, packing=c.packing), None
  name, kind, keys = _catalog_entry(c)
  if kind == "lm" and c.packing:
    return catalog.packed_texts(name, c.data_dir, split, c.seq_len, keys["text"]), None
  source = catalog.data_source(name, c.data_dir, split)
  if kind == "lm":
    return source, lambda ex: _text_lm(catalog.text_bytes(ex[keys["text"]]), c.seq_len)
  if kind == "text_classification":
    return source, lambda ex: _token_classification(catalog.text_bytes(ex[keys["text"]]), ex[keys["label"]],
                                                    c.seq_len)
  return source, lambda ex: _image_classification(ex[keys["image"]], ex[keys["label"]], c.as_tokens)


def _catalog_entry(c):
  if c.name in catalog.KNOWN:
    kind, keys = catalog.KNOWN[c.name]
    return c.name, kind, keys
  return c.name[len("tfds:"):], c.kind, {"text": c.text_key, "label": c.label_key, "image": c.image_key}


def _image_spec(c, shape, num_classes, splits, eval_split):
  if c.as_tokens:
    return DatasetSpec(c.name, "classification", "tokens", 256, num_classes, shape[0] * shape[1], None, splits,
                       eval_split)
  return DatasetSpec(c.name, "classification", "image", None, num_classes, None, shape, splits, eval_split)


def _with_full_mask(ex):
  return {"inputs": ex["inputs"], "targets": ex["targets"], "mask": np.ones(ex["inputs"].shape, bool)}


def _padded(ids, length, fill=0):
  out = np.full(length, fill, np.int32)
  out[:len(ids)] = ids[:length]
  return out


def _token_classification(ids, label, seq_len):
  ids = np.asarray(ids)[:seq_len]
  return {"inputs": _padded(ids, seq_len), "mask": np.arange(seq_len) < len(ids), "label": np.int32(label)}


def _text_lm(ids, seq_len):
  ids = ids[:seq_len + 1]
  n = max(len(ids) - 1, 0)
  return {"inputs": _padded(ids[:-1], seq_len), "targets": _padded(ids[1:], seq_len, IGNORE_INDEX),
          "mask": np.arange(seq_len) < n}


def _image_classification(image, label, as_tokens):
  image = np.asarray(image, np.uint8)
  if not as_tokens:
    return {"image": image, "label": np.int32(label)}
  gray = image[..., 0] if image.shape[-1] == 1 else np.rint(image[..., :3] @ np.array([0.299, 0.587, 0.114]))
  tokens = gray.reshape(-1).astype(np.int32)
  return {"inputs": tokens, "mask": np.ones(tokens.shape, bool), "label": np.int32(label)}
