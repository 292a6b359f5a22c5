"""Documents packed into fixed-length language-modelling rows with segment ids.

A document of n tokens is cut into windows of at most T+1 tokens with stride T (window j is tokens
[jT, jT + T + 1)), so every token but the first is predicted exactly once. Full windows fill a row
each; the shorter last windows are packed first-fit by decreasing length. A row holds T+1 tokens:
inputs are its first T, targets its last T; the target of input t is scored only when tokens t and
t+1 are in one window (no prediction across documents or into padding). Segment ids number the
windows of a row from 1; padding is 0.

The layout is computed from the documents' lengths alone (`plan`), so a corpus larger than memory packs too:
`PackedRows` fills row r on demand, reading only the documents placed in it; `pack` fills every row of
documents at hand.
"""
import array
import dataclasses
import heapq

import numpy as np

from experiments.data.targets import IGNORE_INDEX


def example(tokens, segments):
  """dict(inputs [T], targets [T] (IGNORE_INDEX where not scored), mask [T] (real inputs), segment_ids [T]) of
  one row: tokens, segments [T+1] int32."""
  scored = (segments[1:] == segments[:-1]) & (segments[1:] > 0)
  return {"inputs": tokens[:-1], "targets": np.where(scored, tokens[1:], IGNORE_INDEX).astype(np.int32),
          "mask": segments[:-1] > 0, "segment_ids": segments[:-1]}


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where every window goes. Piece p is tokens [start[p], start[p] + length[p]) of document `document[p]`
  (document, start, length: [P] ints, int32 where the values fit); row r holds pieces
  row_starts[r] : row_starts[r+1] (row_starts: [N+1] int64) back to back from position 0, the s-th as segment s."""
  document: np.ndarray
  start: np.ndarray
  length: np.ndarray
  row_starts: np.ndarray
  seq_len: int

  def __len__(self):
    return len(self.row_starts) - 1

  @property
  def efficiency(self):
    """The fraction of row positions that hold real tokens: sum(length) / (N (T+1))."""
    return float(self.length.sum() / (len(self) * (self.seq_len + 1))) if len(self) else 1.0

  def documents(self, r):
    """The documents of the pieces of row r, in row order."""
    return self.document[self.row_starts[r]:self.row_starts[r + 1]]

  def fill(self, r, documents):
    """(tokens [T+1] int32, segments [T+1] int32) of row r; documents: the tokens of `self.documents(r)`."""
    tokens = np.zeros(self.seq_len + 1, np.int32)
    segments = np.zeros(self.seq_len + 1, np.int32)
    pieces = range(self.row_starts[r], self.row_starts[r + 1])
    at = 0
    for s, (p, doc) in enumerate(zip(pieces, documents), start=1):
      start, n = self.start[p], self.length[p]
      tokens[at:at + n] = doc[start:start + n]
      segments[at:at + n] = s
      at += n
    return tokens, segments


def plan(lengths, seq_len):
  """The Plan packing documents of `lengths` ([D] ints >= 0) into rows of seq_len + 1 tokens (module doc)."""
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len}: expected a positive length")
  lengths = np.asarray(lengths, np.int64)
  if lengths.ndim != 1 or np.any(lengths < 0):
    raise ValueError(f"lengths of shape {lengths.shape}: expected [num_documents] lengths >= 0")
  width = seq_len + 1
  counts = np.where(lengths > 1, (lengths - 2) // seq_len + 1, 0)  # ceil((n - 1) / T) windows
  document = np.repeat(np.arange(len(lengths)), counts)
  start = (np.arange(len(document)) - np.repeat(np.cumsum(counts) - counts, counts)) * seq_len
  length = np.minimum(width, lengths[document] - start)
  full = np.flatnonzero(length == width)
  short = np.flatnonzero(length < width)
  short = short[np.argsort(-length[short], kind="stable")]
  rows = _assign_rows(length[short], width, first_row=len(full))
  inserted = np.concatenate([full, short])
  row_of = np.concatenate([np.arange(len(full)), rows])
  order = inserted[np.argsort(row_of, kind="stable")]
  row_starts = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=len(full)))])
  return Plan(_compact(document[order]), _compact(start[order]), _compact(length[order]),
              row_starts.astype(np.int64), seq_len)


def _compact(values):
  """`values` as int32 when they fit (half the memory of a plan over tens of millions of documents)."""
  return values.astype(np.int32) if values.size == 0 or values.max() < 2**31 else values


def _assign_rows(lengths, width, first_row):
  """The row of each window of `lengths` (in this order): the row with the most room (the first such) when it fits,
  else a new one, numbered from first_row."""
  scale = first_row + len(lengths) + 1
  free = []  # used * scale + row of the rows started here: the most room (then the lowest row) first
  rows = array.array("q")
  new = first_row
  for n in lengths.tolist():
    if free and width - free[0] // scale >= n:
      rows.append(free[0] % scale)
      heapq.heapreplace(free, free[0] + n * scale)
    else:
      rows.append(new)
      heapq.heappush(free, n * scale + new)
      new += 1
  return np.frombuffer(rows, np.int64) if rows else np.zeros(0, np.int64)


class PackedRows:
  """Random-access rows of a Plan, each filled when read: `read(indices)` returns those documents' tokens."""

  def __init__(self, layout, read):
    self.plan = layout
    self.read = read

  @property
  def efficiency(self):
    return self.plan.efficiency

  def __len__(self):
    return len(self.plan)

  def __getitem__(self, r):
    """dict(inputs, targets, mask, segment_ids) [T] of row r (see `example`)."""
    if not 0 <= r < len(self):
      raise IndexError(r)
    return example(*self.plan.fill(r, self.read(self.plan.documents(r))))


@dataclasses.dataclass(frozen=True)
class Packed:
  """Rows of packed windows: `tokens` [N, T+1] int32, `segments` [N, T+1] int32 (0 = padding)."""
  tokens: np.ndarray
  segments: np.ndarray

  @property
  def efficiency(self):
    """The fraction of row positions that hold real tokens."""
    return float(np.mean(self.segments > 0)) if self.segments.size else 1.0

  def __len__(self):
    return len(self.tokens)

  def __getitem__(self, i):
    """dict(inputs [T], targets [T] (IGNORE_INDEX where not scored), mask [T] (real inputs), segment_ids [T])."""
    return example(self.tokens[i], self.segments[i])


def report(num_documents, split, packed, seq_len):
  """Prints how `packed` (a Plan, Packed or PackedRows of seq_len + 1 bytes a row) fills its rows."""
  print(f"packed {num_documents} documents ({split}) into {len(packed)} rows of {seq_len + 1} bytes: "
        f"{100 * packed.efficiency:.2f}% real tokens")


def windows(document, seq_len):
  """The windows of one document: tokens [jT, jT + T + 1) for j = 0, 1, ... (the last may be shorter; a
  one-token document has nothing to predict and gives none)."""
  n = len(document)
  return [document[start:start + seq_len + 1] for start in range(0, max(n - 1, 0), seq_len)]


def pack(documents, seq_len):
  """Packs the windows of `documents` (1-D int arrays) into rows of seq_len + 1 tokens (see the module doc)."""
  layout = plan([len(d) for d in documents], seq_len)
  filled = [layout.fill(r, [documents[d] for d in layout.documents(r)]) for r in range(len(layout))]
  width = seq_len + 1
  tokens = np.stack([t for t, _ in filled]) if filled else np.zeros((0, width), np.int32)
  segments = np.stack([s for _, s in filled]) if filled else np.zeros((0, width), np.int32)
  return Packed(tokens, segments)
