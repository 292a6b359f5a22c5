"""ListOps (Long Range Arena) as a TFDS builder: nested list operations on digits, 10 classes.

Grammar (LRA's generator): a node is a digit 0-9 or `[OP arg_1 ... arg_n ]` with OP in
MIN, MAX, MED (median, rounded down as `int(np.median)`), SM (sum mod 10), 2 <= n <= max_args,
depth <= max_depth. Below max_depth a node is an operation with probability 1/4. Trees are
redrawn until their length in tokens lies in (min_length, max_length). The label is the value.

Tokens (`VOCAB`, id 0 is padding): `0`..`9`, `[MIN`, `[MAX`, `[MED`, `[SM`, `]`.
"""
import dataclasses
import random

import numpy as np
import tensorflow_datasets as tfds

from experiments.data import synthetic

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
CLOSE = "]"
VOCAB = ("<pad>",) + tuple(str(d) for d in range(10)) + OPERATORS + (CLOSE,)
TOKEN_IDS = {t: i for i, t in enumerate(VOCAB)}
NUM_CLASSES = 10
OPERATION_PROBABILITY = 0.25


def random_tree(rng, max_depth, max_args, depth=1):
  """A nested tuple (op, args...) or an int leaf, drawn with Python's `random.Random` rng."""
  if depth < max_depth and rng.random() < OPERATION_PROBABILITY:
    num_args = rng.randint(2, max_args)
    return (rng.choice(OPERATORS),) + tuple(random_tree(rng, max_depth, max_args, depth + 1) for _ in range(num_args))
  return rng.randrange(10)


def tree_tokens(tree):
  """Flat token strings of a tree: `[MAX 2 [MIN 4 7 ] 0 ]`."""
  if isinstance(tree, int):
    return [str(tree)]
  tokens = [tree[0]]
  for arg in tree[1:]:
    tokens.extend(tree_tokens(arg))
  tokens.append(CLOSE)
  return tokens


def tree_value(tree):
  """The value of a tree in 0..9."""
  if isinstance(tree, int):
    return tree
  op, args = tree[0], [tree_value(a) for a in tree[1:]]
  if op == "[MIN":
    return min(args)
  if op == "[MAX":
    return max(args)
  if op == "[MED":
    return int(np.median(args))
  return sum(args) % 10


def listops_example(rng, *, min_length, max_length, max_depth=10, max_args=10):
  """dict(tokens [L] uint8 with min_length < L < max_length, label int) drawn with `rng`."""
  if not 0 <= min_length < max_length - 1:
    raise ValueError(f"min_length={min_length}, max_length={max_length}: expected 0 <= min_length < max_length - 1")
  py_rng = random.Random(int(rng.integers(2**63)))
  while True:
    tree = random_tree(py_rng, max_depth, max_args)
    tokens = tree_tokens(tree)
    if min_length < len(tokens) < max_length:
      ids = np.array([TOKEN_IDS[t] for t in tokens], np.uint8)
      return {"tokens": ids, "label": tree_value(tree)}


@dataclasses.dataclass(eq=False)
class ListopsConfig(synthetic.SyntheticConfig):
  min_length: int = 500
  max_length: int = 2000
  max_depth: int = 10
  max_args: int = 10


class Listops(synthetic.SyntheticBuilder):
  """ListOps; `lra` is LRA's size (96k/2k/2k examples of 500..2000 tokens)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [ListopsConfig(name="lra", num_train=96_000, num_validation=2_000, num_test=2_000)]
  CONFIG_FIELDS = ("min_length", "max_length", "max_depth", "max_args")

  def _features(self):
    return {
        "tokens": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
    }

  def _example(self, rng):
    c = self.builder_config
    return listops_example(rng, min_length=c.min_length, max_length=c.max_length,
                           max_depth=c.max_depth, max_args=c.max_args)
