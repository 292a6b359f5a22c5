"""Byte-level language modelling over local text files (default: the Python standard library).

The corpus is the concatenation, in sorted path order, of the matching files under a directory
(or one file), each followed by a newline; its last `validation_fraction` of bytes is the
validation split. Example i is the window `corpus[i*T : i*T + T + 1]`: inputs its first T
bytes, targets its last T. Vocabulary: the 256 byte values.

With `packing`, each file is a document: the files before the validation cut are the train split,
those after it validation (the one holding the cut is split there), and each split's documents are packed into rows with
segment ids (`experiments.data.packing`), so no window crosses from one file into another.
"""
import functools
import pathlib
import sysconfig

import numpy as np

from experiments.data import packing as packing_lib

VOCAB_SIZE = 256


def default_corpus():
  """The standard library's source directory (site-packages excluded by `corpus_files`)."""
  return sysconfig.get_paths()["stdlib"]


def corpus_files(path, pattern="*.py"):
  """Sorted files matching `pattern` under directory `path` (or [path] for a file)."""
  root = pathlib.Path(path).expanduser()
  if root.is_file():
    return [root]
  if not root.is_dir():
    raise ValueError(f"corpus={str(path)!r}: expected an existing file or directory")
  files = sorted(f for f in root.rglob(pattern)
                 if f.is_file() and not {"site-packages", "dist-packages"} & set(f.relative_to(root).parts))
  if not files:
    raise ValueError(f"corpus={str(path)!r} has no files matching corpus_glob={pattern!r}")
  return files


@functools.lru_cache(maxsize=2)
def read_corpus(path, pattern="*.py"):
  """All bytes of the corpus as a uint8 array."""
  return np.frombuffer(b"".join(f.read_bytes() + b"\n" for f in corpus_files(path, pattern)), np.uint8)


class ByteWindows:
  """Random-access source of non-overlapping LM windows over a uint8 array.

  `source[i]` = dict(inputs [T] int32, targets [T] int32, mask [T] bool).
  """

  def __init__(self, data, seq_len):
    if seq_len < 1 or len(data) < seq_len + 1:
      raise ValueError(f"seq_len={seq_len}: expected 1 <= seq_len < corpus split size {len(data)}")
    self.data = data
    self.seq_len = seq_len

  def __len__(self):
    return (len(self.data) - 1) // self.seq_len

  def __getitem__(self, i):
    if not 0 <= i < len(self):
      raise IndexError(i)
    window = self.data[i * self.seq_len: (i + 1) * self.seq_len + 1].astype(np.int32)
    return {"inputs": window[:-1], "targets": window[1:], "mask": np.ones(self.seq_len, bool)}


@functools.lru_cache(maxsize=4)
def packed_documents(path, pattern, seq_len, validation_fraction, split):
  """The files of the corpus as documents (each followed by a newline), the train split before the validation
  cut and validation after it (the file holding the cut split there), packed into rows of seq_len + 1 bytes."""
  docs = [np.frombuffer(f.read_bytes() + b"\n", np.uint8) for f in corpus_files(path, pattern)]
  ends = np.cumsum([len(d) for d in docs])
  cut = int(ends[-1] * (1 - validation_fraction))
  i = int(np.searchsorted(ends, cut, side="right"))  # the document holding the cut (if any) is cut there
  inside = cut - (ends[i - 1] if i else 0)
  if i == len(docs):
    train, validation = docs, []
  else:
    train, validation = docs[:i] + [docs[i][:inside]], [docs[i][inside:]] + docs[i + 1:]
  chosen = [d for d in (train if split == "train" else validation) if len(d)]
  packed = packing_lib.pack(chosen, seq_len)
  packing_lib.report(len(chosen), split, packed, seq_len)
  return packed


def byte_source(split, *, seq_len, corpus="", corpus_glob="*.py", validation_fraction=0.05, packing=False):
  """ByteWindows over the train or validation part of the corpus; with `packing`, its files packed as documents."""
  if not 0 < validation_fraction < 1:
    raise ValueError(f"validation_fraction={validation_fraction}: expected a number in (0, 1)")
  if split not in ("train", "validation"):
    raise ValueError(f"split={split!r}: the byte corpus has splits ['train', 'validation']")
  if packing:
    return packed_documents(corpus or default_corpus(), corpus_glob, seq_len, validation_fraction, split)
  data = read_corpus(corpus or default_corpus(), corpus_glob)
  cut = int(len(data) * (1 - validation_fraction))
  if split == "train":
    return ByteWindows(data[:cut], seq_len)
  if split == "validation":
    return ByteWindows(data[cut:], seq_len)
  raise ValueError(f"split={split!r}: the byte corpus has splits ['train', 'validation']")
