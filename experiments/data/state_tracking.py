"""State tracking: the word problem of a finite group (parity, S3, S5) as a TFDS builder.

An example is a word g_1 g_2 ... g_T of group elements drawn uniformly; the target at position t is the
running product p_t = g_t p_{t-1} (p_0 the identity; p_t applies p_{t-1} first, then g_t), so a model must
carry the group state through the whole prefix (Merrill et al. 2024, "The Illusion of State"; Grazzi et al.
2024 for linear RNNs: parity needs a negative eigenvalue in the state transition, S5 a non-diagonal one).
Tokens are element indices in [0, |G|), inputs and targets alike: parity is Z2 (0 = even), S_n's elements are
the permutations of range(n) in lexicographic order (0 = identity). Every position is scored.
"""
import dataclasses
import functools
import itertools

import numpy as np
import tensorflow_datasets as tfds

from experiments.data import synthetic

GROUPS = ("parity", "s3", "s5")


@functools.lru_cache(maxsize=None)
def multiplication_table(group):
  """`[|G|, |G|]` int32: table[a, b] = index of a b, the element that applies b first, then a."""
  if group == "parity":
    return np.array([[0, 1], [1, 0]], np.int32)
  if group not in GROUPS:
    raise ValueError(f"group={group!r}: expected one of {list(GROUPS)}")
  perms = list(itertools.permutations(range(int(group[1:]))))
  index = {p: i for i, p in enumerate(perms)}
  return np.array([[index[tuple(a[j] for j in b)] for b in perms] for a in perms], np.int32)


def group_order(group):
  return multiplication_table(group).shape[0]


def running_products(word, group):
  """p_t = g_t p_{t-1}, p_0 = identity (index 0), for a word `[T]` of element indices."""
  table = multiplication_table(group)
  out = np.empty(len(word), np.int32)
  state = 0
  for t, g in enumerate(word):
    state = table[g, state]
    out[t] = state
  return out


def state_tracking_example(rng, *, group, seq_len):
  """One example: dict(inputs [T] int32 elements, targets [T] int32 running products) drawn with `rng`."""
  word = rng.integers(0, group_order(group), size=seq_len).astype(np.int32)
  return {"inputs": word, "targets": running_products(word, group)}


@dataclasses.dataclass(eq=False)
class StateTrackingConfig(synthetic.SyntheticConfig):
  group: str = "parity"
  seq_len: int = 64


class StateTracking(synthetic.SyntheticBuilder):
  """Group word problems; any group and length via `config=StateTrackingConfig(...)` (or `make_config`)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [StateTrackingConfig(name=f"{g}_t64", group=g, seq_len=64) for g in GROUPS]
  CONFIG_FIELDS = ("group", "seq_len")

  def _features(self):
    return synthetic.token_sequence_features(self.builder_config.seq_len)

  def _example(self, rng):
    c = self.builder_config
    return state_tracking_example(rng, group=c.group, seq_len=c.seq_len)
