"""TFDS catalog datasets already prepared in a data_dir (lm1b, imdb_reviews, cifar10, ...).

They are read from their prepared files alone (no dataset code, no TensorFlow), so they must
have been built in the array_record format, e.g. on a machine with TensorFlow:

    tfds build imdb_reviews --data_dir DIR --file_format array_record

`name` may carry a config and version as TFDS spells them: `imdb_reviews/plain_text:1.0.0`.

Texts of kind "lm" may be packed (`packed_texts`): each text's UTF-8 bytes are a document, packed into rows with
segment ids by `experiments.data.packing`. The layout comes from the documents' lengths, measured in one pass over
the split the first time and cached in data_dir/packing_cache/<dataset>/<version>/ with the layout computed from
them for each seq_len (later runs read none of the texts to lay the rows out); a row reads only its own texts.
"""
import dataclasses
import functools
import hashlib
import os
import urllib.parse

import numpy as np
from tensorflow_datasets.core import read_only_builder

from experiments.data import packing

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
CACHE = "packing_cache"  # folder of data_dir holding the document lengths of packed splits
READ_CHUNK = 4096  # texts read at once when measuring a split


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
  return _split_source(load_builder(name, data_dir), name, split)


def _split_source(builder, name, split):
  if split.split("[")[0] not in builder.info.splits:
    raise ValueError(f"split={split!r}: {name!r} has splits {sorted(builder.info.splits)}")
  return builder.as_data_source(split=split)


def text_bytes(value):
  """A text feature (str or bytes) as a uint8 array of its UTF-8 bytes."""
  if isinstance(value, str):
    value = value.encode("utf-8")
  return np.frombuffer(bytes(value), np.uint8)


def _cache_path(builder, data_dir, split, text_key, what):
  """Where `what` (a file name's end) of the texts (feature `text_key`) of `split` is cached."""
  file = f"{urllib.parse.quote(split, safe='')}.{urllib.parse.quote(text_key, safe='')}.{what}"
  return os.path.join(data_dir, CACHE, builder.info.full_name, file)


def document_lengths(source, text_key, path):
  """[len(source)] int64: the byte length of each text, read from `path` when it holds them, else measured in one
  pass over `source` and saved there."""
  if os.path.exists(path):
    lengths = np.load(path)
    if lengths.shape == (len(source),):
      return lengths
  print(f"measuring the {len(source)} texts once (cached in {path})", flush=True)
  lengths = np.zeros(len(source), np.int64)
  for begin in range(0, len(source), READ_CHUNK):
    examples = source.__getitems__(list(range(begin, min(begin + READ_CHUNK, len(source)))))
    lengths[begin:begin + len(examples)] = [len(text_bytes(ex[text_key])) for ex in examples]
  _save(path, lambda f: np.save(f, lengths))
  return lengths


def cached_plan(lengths, seq_len, path):
  """`packing.plan(lengths, seq_len)`, read from `path` when it was saved there for these lengths, else computed
  (a minute for lm1b's 30M texts) and saved there."""
  digest = hashlib.sha256(np.ascontiguousarray(lengths, np.int64).tobytes()).hexdigest()
  fields = [f.name for f in dataclasses.fields(packing.Plan) if f.name != "seq_len"]
  if os.path.exists(path):
    with np.load(path) as saved:
      if str(saved["digest"]) == digest and int(saved["seq_len"]) == seq_len:
        return packing.Plan(**{k: saved[k] for k in fields}, seq_len=seq_len)
  layout = packing.plan(lengths, seq_len)
  _save(path, lambda f: np.savez(f, digest=digest, seq_len=seq_len, **{k: getattr(layout, k) for k in fields}))
  return layout


def _save(path, write):
  """Calls write(file) on a new file that becomes `path` once written (hosts writing at once each write it whole)."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as f:
      write(f)
    os.replace(temporary, path)
  except OSError as e:
    print(f"could not cache {path} ({e}); it will be computed again next time")


@functools.lru_cache(maxsize=4)
def packed_texts(name, data_dir, split, seq_len, text_key):
  """The texts (feature `text_key`) of `split` as documents packed into rows of seq_len + 1 bytes with segment ids:
  a `packing.PackedRows` whose row r reads only the texts placed in it."""
  builder = load_builder(name, data_dir)
  source = _split_source(builder, name, split)
  lengths = document_lengths(source, text_key, _cache_path(builder, data_dir, split, text_key, "lengths.npy"))
  layout = cached_plan(lengths, seq_len, _cache_path(builder, data_dir, split, text_key, f"plan{seq_len}.npz"))
  packing.report(len(lengths), split, layout, seq_len)
  return packing.PackedRows(
      layout, lambda docs: [text_bytes(ex[text_key]) for ex in source.__getitems__(docs.tolist())])
