"""Multi-query associative recall (Zoology, arXiv 2312.04927) as a TFDS builder.

An example over vocabulary V with P pairs and length T:

    context  k_1 v_1 k_2 v_2 ... k_P v_P        keys in [1, V/2), values in [V/2, V), distinct
    queries  each key once more, at slot g of the (T - 2P)/2 slots after the context,
             slots drawn without replacement with p(g) ~ (g + 1)^(a - 1), a = 0.01

The sequence is laid out as a causal LM pair: `inputs[t]` is token t, `targets[t]` is the
token the model must emit after reading `inputs[:t+1]`. Only query positions carry a target
(the value paired with the queried key); every other target is IGNORE_INDEX (-100). Tokens
that are neither context nor query are uniform noise over [0, V) (`random_non_queries`, the
default of Zoology's generator) or 0 (what Zoology's Figure 2 trains on, and configs/mqar.py's default).
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from experiments.data import synthetic
from experiments.data.targets import IGNORE_INDEX


def mqar_example(rng, *, vocab_size, seq_len, num_pairs, power_a=0.01, random_non_queries=True):
  """One example: dict(inputs [T] int32, targets [T] int32) drawn with `rng` (np.random.Generator)."""
  validate_mqar(vocab_size=vocab_size, seq_len=seq_len, num_pairs=num_pairs)
  half = vocab_size // 2
  keys = rng.choice(np.arange(1, half), size=num_pairs, replace=False)
  values = rng.choice(np.arange(half, vocab_size), size=num_pairs, replace=False)
  context = 2 * num_pairs
  num_slots = (seq_len - context) // 2
  weights = np.arange(1, num_slots + 1, dtype=np.float64) ** (power_a - 1.0)
  slots = rng.choice(num_slots, size=num_pairs, replace=False, p=weights / weights.sum())

  if random_non_queries:
    inputs = rng.integers(0, vocab_size, size=seq_len)
  else:
    inputs = np.zeros(seq_len, np.int64)
  inputs[0:context:2] = keys
  inputs[1:context:2] = values
  query_positions = context + 2 * slots
  inputs[query_positions] = keys
  targets = np.full(seq_len, IGNORE_INDEX, np.int64)
  targets[query_positions] = values
  return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32)}


def validate_mqar(*, vocab_size, seq_len, num_pairs):
  """Raises ValueError unless P distinct keys and values and P query slots fit."""
  if num_pairs < 1 or 4 * num_pairs > seq_len:
    raise ValueError(f"num_pairs={num_pairs} with seq_len={seq_len}: expected 1 <= num_pairs <= seq_len / 4")
  if seq_len % 2:
    raise ValueError(f"seq_len={seq_len}: expected an even length")
  if vocab_size // 2 - 1 < num_pairs:
    raise ValueError(f"vocab_size={vocab_size}: expected at least {2 * num_pairs + 2} tokens for {num_pairs} pairs")


@dataclasses.dataclass(eq=False)
class MqarConfig(synthetic.SyntheticConfig):
  vocab_size: int = 8192
  seq_len: int = 64
  num_pairs: int = 4
  power_a: float = 0.01
  random_non_queries: bool = True


class Mqar(synthetic.SyntheticBuilder):
  """MQAR; one BuilderConfig per point of the Zoology grid, any other via `config=MqarConfig(...)`."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      MqarConfig(name=f"v8192_t{t}_p{p}", seq_len=t, num_pairs=p, num_train=100_000, num_test=3_000)
      for t, p in ((64, 4), (128, 8), (256, 16), (512, 64))
  ]
  CONFIG_FIELDS = ("vocab_size", "seq_len", "num_pairs", "power_a", "random_non_queries")

  def _features(self):
    return synthetic.token_sequence_features(self.builder_config.seq_len)

  def _example(self, rng):
    c = self.builder_config
    return mqar_example(rng, vocab_size=c.vocab_size, seq_len=c.seq_len, num_pairs=c.num_pairs,
                        power_a=c.power_a, random_non_queries=c.random_non_queries)
