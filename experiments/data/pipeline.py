"""Shuffling, batching, per-host sharding and resumption of a random-access source, with grain.

The order is a pure function of (seed, epoch, position): epoch e visits the source in the
permutation grain derives from (seed, e); the epochs are concatenated into one stream of
examples, and global batch s holds stream examples [s*B, (s+1)*B). Host p of P receives rows
[p*B/P, (p+1)*B/P) of every global batch. Starting at step s yields exactly what an
uninterrupted run yields from step s on; every batch is computed from its index alone.

A finite stream (num_epochs set) is padded up to a whole number of global batches with
examples whose `valid` is False (targets IGNORE_INDEX, everything else zero).
"""
import grain
import numpy as np

from experiments.data.targets import IGNORE_INDEX

NUM_THREADS = 2  # grain threads reading and transforming examples
PREFETCH = 4  # batches read ahead


def padding_example(example):
  """An example shaped like `example` that counts for nothing: zeros, ignored targets, invalid."""
  pad = {k: np.zeros_like(v) for k, v in example.items()}
  if "targets" in pad:
    pad["targets"] = np.full_like(example["targets"], IGNORE_INDEX)
  pad["valid"] = np.zeros((), bool)
  return pad


def batches(source, *, batch_size, seed, transform=None, shuffle=True, num_epochs=None, start_step=0,
            process_index=0, process_count=1):
  """Iterator over this host's batches: dicts of numpy arrays with leading axis batch_size / process_count.

  source: random-access examples (`len`, `[i]`); transform: example -> dict of fixed-shape
  numpy arrays (applied before batching); num_epochs None repeats forever.
  """
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size={batch_size}: expected a positive multiple of process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}: expected 0 <= process_index < process_count={process_count}")
  if start_step < 0:
    raise ValueError(f"start_step={start_step}: expected >= 0")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs}: expected None (forever) or >= 1")
  if len(source) == 0:
    raise ValueError("source is empty")

  transform = transform or (lambda ex: ex)
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.map(lambda ex: {**transform(ex), "valid": np.ones((), bool)})
  if num_epochs is not None:
    ds = _pad_to_multiple(ds, batch_size)
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  ds = ds[process_index::process_count]
  ds = ds[start_step:]
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=NUM_THREADS, prefetch_buffer_size=PREFETCH)))


def num_batches(num_examples, *, batch_size, num_epochs=1):
  """Global batches in a finite stream (the last one padded)."""
  return -(-num_examples * num_epochs // batch_size)


def _pad_to_multiple(ds, multiple):
  n = len(ds)
  if n % multiple == 0:
    return ds
  pad = padding_example(ds[0])
  return grain.MapDataset.range(n + (-n) % multiple).map(lambda i: ds[i] if i < n else pad)
