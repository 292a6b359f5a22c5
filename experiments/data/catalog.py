"""TFDS catalog datasets already prepared in a data_dir (lm1b, imdb_reviews, cifar10, ...).

They are read from their prepared files alone (no dataset code, no TensorFlow), so they must
have been built in the array_record format, e.g. on a machine with TensorFlow:

    tfds build imdb_reviews --data_dir DIR --file_format array_record

`name` may carry a config and version as TFDS spells them: `imdb_reviews/plain_text:1.0.0`.
"""
from tensorflow_datasets.core import read_only_builder

# name -> (kind, feature keys): kind is "lm" (text), "text_classification" or "image_classification".
KNOWN = {
    "lm1b": ("lm", {"text": "text"}),
    "imdb_reviews": ("text_classification", {"text": "text", "label": "label"}),
    "cifar10": ("image_classification", {"image": "image", "label": "label"}),
    "cifar100": ("image_classification", {"image": "image", "label": "label"}),
    "mnist": ("image_classification", {"image": "image", "label": "label"}),
    "fashion_mnist": ("image_classification", {"image": "image", "label": "label"}),
}
KINDS = ("lm", "text_classification", "image_classification")


def build_command(name, data_dir):
  """The shell command that prepares `name` in `data_dir` in a format read here."""
  return f"tfds build {name} --data_dir {data_dir} --file_format array_record"


def load_builder(name, data_dir):
  """The read-only builder of a prepared dataset; ValueError with the build command if absent."""
  try:
    builder = read_only_builder.builder_from_files(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises several types for a dataset that is not there
    raise ValueError(
        f"dataset {name!r} is not prepared in data_dir={data_dir!r} ({type(e).__name__}). Prepare it once "
        f"(needs TensorFlow and internet): `pip install tensorflow && {build_command(name, data_dir)}`, "
        f"then point config.data.data_dir at that directory.") from e
  file_format = builder.info.file_format
  if file_format is None or file_format.value not in ("array_record", "parquet"):
    raise ValueError(
        f"dataset {name!r} in data_dir={data_dir!r} is stored as {file_format}, which has no random access; "
        f"rebuild it with `{build_command(name, data_dir)}`")
  return builder


def data_source(name, data_dir, split):
  """Random-access source of `split` (TFDS split syntax, e.g. 'train[:90%]')."""
  builder = load_builder(name, data_dir)
  if split.split("[")[0] not in builder.info.splits:
    raise ValueError(f"split={split!r}: {name!r} has splits {sorted(builder.info.splits)}")
  return builder.as_data_source(split=split)
