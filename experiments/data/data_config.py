"""The fields of `config.data`, their defaults per dataset, and their validation.

Every dataset:   name, data_dir (TFDS data_dir; default $TFDS_DATA_DIR or ~/tensorflow_datasets)
mqar:            seed, num_train, num_validation, num_test, vocab_size, seq_len, num_pairs, power_a,
                 random_non_queries
listops:         seed, num_train, num_validation, num_test, seq_len (padded length, >= max_length - 1),
                 min_length, max_length, max_depth, max_args
state_tracking:  seed, num_train, num_validation, num_test, group (parity | s3 | s5), seq_len
pathfinder:      seed, num_train, num_validation, num_test, resolution (32 or 64 as in LRA, any >= 16),
                 num_distractors, as_tokens (image -> flattened pixel tokens)
bytes:           seq_len, corpus ('' = the Python standard library; a file or directory),
                 corpus_glob (files of a directory matching it, recursively), validation_fraction,
                 packing (each file a document, packed into rows with segment ids)
catalog names:   seq_len (bytes kept per text; packed: bytes a row), as_tokens (images), and for
                 `tfds:NAME` also kind (lm | text_classification | image_classification), text_key, label_key,
                 image_key
lm1b, tfds:NAME: packing (kind lm: each text a document, packed into rows with segment ids as the bytes
                 corpus's files; False: one text a row, cut or padded to seq_len + 1 bytes; False for other kinds)

`seed` here is the generation seed of a synthetic dataset; the data order is keyed by the
`seed` argument of `get_dataset`.

`resolve` completes and checks a `config.data` once and returns it read-only; the entry points of
`experiments.data` use such a config as it is, and resolve any other on every call.
"""
import os

import ml_collections

from experiments.data import catalog
from experiments.data import state_tracking

SYNTHETIC = ("mqar", "listops", "pathfinder", "state_tracking")
LOCAL = SYNTHETIC + ("bytes",)


def valid_names():
  return LOCAL + tuple(catalog.KNOWN) + ("tfds:<name>",)


def default_data_dir():
  return os.environ.get("TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets"))


def _sizes(train, validation, test):
  return dict(seed=0, num_train=train, num_validation=validation, num_test=test)


def defaults(name):
  """The default `config.data` of dataset `name` (a fresh ConfigDict)."""
  common = dict(name=name, data_dir=default_data_dir())
  if name == "mqar":
    fields = dict(**_sizes(10_000, 1_000, 1_000), vocab_size=8192, seq_len=64, num_pairs=4, power_a=0.01,
                  random_non_queries=True)
  elif name == "listops":
    fields = dict(**_sizes(20_000, 2_000, 2_000), seq_len=2048, min_length=500, max_length=2000, max_depth=10,
                  max_args=10)
  elif name == "state_tracking":
    fields = dict(**_sizes(10_000, 1_000, 1_000), group="parity", seq_len=64)
  elif name == "pathfinder":
    fields = dict(**_sizes(20_000, 2_000, 2_000), resolution=32, num_distractors=2, as_tokens=False)
  elif name == "bytes":
    fields = dict(seq_len=256, corpus="", corpus_glob="*.py", validation_fraction=0.05, packing=True)
  elif name in catalog.KNOWN:
    fields = dict(seq_len=512, as_tokens=False, **(dict(packing=True) if catalog.KNOWN[name][0] == "lm" else {}))
  elif name.startswith("tfds:") and len(name) > 5:
    fields = dict(seq_len=512, as_tokens=False, kind="", text_key="text", label_key="label", image_key="image",
                  packing=True)
  else:
    raise ValueError(f"config.data.name={name!r}: expected one of {list(valid_names())}")
  return ml_collections.ConfigDict({**common, **fields})


def resolve(data_config):
  """Defaults of `data_config.name` overridden by the fields set, read-only (a FrozenConfigDict); ValueError on
  unknown fields or bad values."""
  given = dict(data_config.items()) if hasattr(data_config, "items") else dict(data_config)
  if "name" not in given:
    raise ValueError(f"config.data has no 'name'; expected one of {list(valid_names())}")
  config = defaults(given["name"])
  unknown = sorted(set(given) - set(config.keys()))
  if unknown:
    raise ValueError(f"config.data: unknown fields {unknown} for dataset {given['name']!r}; "
                     f"valid fields: {sorted(config.keys())}")
  if "packing" in given and not isinstance(given["packing"], bool):
    raise ValueError(f"config.data.packing={given['packing']!r}: expected True or False")
  config.update(given)
  config.data_dir = os.path.expanduser(config.data_dir)
  if config.name.startswith("tfds:") and config.kind != "lm":
    config.packing = False  # only texts of kind lm are packed
  _check(config)
  return ml_collections.FrozenConfigDict(config)


def resolved(data_config):
  """`data_config` itself when `resolve` made it, else `resolve(data_config)`."""
  if isinstance(data_config, ml_collections.FrozenConfigDict):
    return data_config
  return resolve(data_config)


def _check(c):
  if c.get("seq_len", 1) < 1:
    raise ValueError(f"config.data.seq_len={c.seq_len}: expected >= 1")
  if c.name == "listops" and c.seq_len < c.max_length - 1:
    raise ValueError(f"config.data.seq_len={c.seq_len}: expected >= max_length - 1 = {c.max_length - 1} "
                     "so that no ListOps expression is cut")
  if c.name == "state_tracking" and c.group not in state_tracking.GROUPS:
    raise ValueError(f"config.data.group={c.group!r}: expected one of {list(state_tracking.GROUPS)}")
  if c.name.startswith("tfds:") and c.kind not in catalog.KINDS:
    raise ValueError(f"config.data.kind={c.kind!r}: expected one of {list(catalog.KINDS)} for {c.name!r}")
