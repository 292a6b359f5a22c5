"""Base of the locally generated TFDS datasets: seeded, sized by a BuilderConfig, array_record.

Example i of split s is drawn from `np.random.default_rng([seed, SPLIT_IDS[s], i])`, so an
example depends only on (seed, split, index, generation fields), never on how many examples
are built or in which order. Preparing needs no TensorFlow:

    builder = Mqar(config=Mqar.make_config(seq_len=64, num_pairs=4), data_dir=DIR)
    builder.download_and_prepare(file_format="array_record")
    tfds.data_source(builder.info.full_name.rsplit("/", 1)[0], data_dir=DIR, split="train")
"""
import contextlib
import dataclasses
import inspect
import logging

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Fields shared by every generated dataset: the generation seed and the split sizes."""
  seed: int = 0
  num_train: int = 10_000
  num_validation: int = 1_000
  num_test: int = 1_000


class SyntheticBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A dataset drawn example by example from `_example(rng)`; subclasses give the features.

  CONFIG_FIELDS names the generation fields of the subclass's config; together with the seed
  and the split sizes they make the config name, hence the cache directory in `data_dir`.
  """

  CONFIG_FIELDS = ()

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS's own lookup needs the `importlib_resources` backport, absent without TensorFlow.
    return epath.Path(inspect.getfile(cls))

  @classmethod
  def make_config(cls, **fields):
    """A config of this builder's BuilderConfig class named after all its field values."""
    config_cls = type(cls.BUILDER_CONFIGS[0])
    known = {f.name for f in dataclasses.fields(config_cls)} - {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f"{cls.__name__} config: unknown fields {unknown}; valid fields: {sorted(known)}")
    probe = config_cls(name="probe", **fields)
    keys = tuple(cls.CONFIG_FIELDS) + ("seed", "num_train", "num_validation", "num_test")
    name = "_".join(f"{k}-{_fmt(getattr(probe, k))}" for k in keys)
    return config_cls(name=name, **fields)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=type(self).__doc__,
        features=tfds.features.FeaturesDict(self._features()))

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
    return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

  def _generate_examples(self, split, num_examples):
    seed = self.builder_config.seed
    for i in range(num_examples):
      yield i, self._example(np.random.default_rng([seed, SPLIT_IDS[split], i]))

  def _features(self):
    raise NotImplementedError

  def _example(self, rng):
    raise NotImplementedError


def token_sequence_features(seq_len):
  """The features of a sequence-to-sequence example: inputs and targets, `[seq_len]` int32 each."""
  return {"inputs": tfds.features.Tensor(shape=(seq_len,), dtype=np.int32),
          "targets": tfds.features.Tensor(shape=(seq_len,), dtype=np.int32)}


def _fmt(value):
  if isinstance(value, bool):
    return str(int(value))
  return str(value).replace(".", "p")


def prepare(builder_cls, data_dir, **fields):
  """Builds (once, without a progress bar; later calls reuse `data_dir`) and returns `builder_cls` with these
  fields."""
  with _quiet_absl():
    builder = builder_cls(config=builder_cls.make_config(**fields), data_dir=data_dir)
    prepared = builder.is_prepared()
  if not prepared:
    previous = tqdm_utils._active  # pylint: disable=protected-access
    tfds.display_progress_bar(False)
    try:
      builder.download_and_prepare(file_format="array_record")
    finally:
      tfds.display_progress_bar(previous)
  return builder


def data_source(builder, split):
  """Random-access source of one split of a prepared builder, read through `tfds.data_source`."""
  name = f"{builder.name}/{builder.builder_config.name}:{builder.version}"
  with _quiet_absl():
    return tfds.data_source(name, data_dir=builder.data_dir_root, split=split, download=False)


@contextlib.contextmanager
def _quiet_absl():
  """Hides TFDS's warnings that a config is not among BUILDER_CONFIGS (ours are made per call)."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)
