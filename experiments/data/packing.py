"""Documents packed into fixed-length language-modelling rows with segment ids.

A document of n tokens is cut into windows of at most T+1 tokens with stride T (window j is tokens
[jT, jT + T + 1)), so every token but the first is predicted exactly once. Full windows fill a row
each; the shorter last windows are packed first-fit by decreasing length. A row holds T+1 tokens:
inputs are its first T, targets its last T; the target of input t is scored only when tokens t and
t+1 are in one window (no prediction across documents or into padding). Segment ids number the
windows of a row from 1; padding is 0.
"""
import dataclasses
import heapq

import numpy as np

from experiments.data.targets import IGNORE_INDEX


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
    tokens, segments = self.tokens[i], self.segments[i]
    scored = (segments[1:] == segments[:-1]) & (segments[1:] > 0)
    return {"inputs": tokens[:-1], "targets": np.where(scored, tokens[1:], IGNORE_INDEX).astype(np.int32),
            "mask": segments[:-1] > 0, "segment_ids": segments[:-1]}


def windows(document, seq_len):
  """The windows of one document: tokens [jT, jT + T + 1) for j = 0, 1, ... (the last may be shorter; a
  one-token document has nothing to predict and gives none)."""
  n = len(document)
  return [document[start:start + seq_len + 1] for start in range(0, max(n - 1, 0), seq_len)]


def pack(documents, seq_len):
  """Packs the windows of `documents` (1-D int arrays) into rows of seq_len + 1 tokens (see the module doc)."""
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len}: expected a positive length")
  width = seq_len + 1
  pieces = [w for doc in documents for w in windows(np.asarray(doc), seq_len)]
  full = [w for w in pieces if len(w) == width]
  short = sorted((w for w in pieces if len(w) < width), key=len, reverse=True)
  rows = [[w] for w in full]
  free = []  # (-space left, row index) of the rows with room, most room first
  for w in short:
    if free and -free[0][0] >= len(w):
      space, r = heapq.heappop(free)
      rows[r].append(w)
      heapq.heappush(free, (space + len(w), r))
    else:
      rows.append([w])
      heapq.heappush(free, (-(width - len(w)), len(rows) - 1))
  tokens = np.zeros((len(rows), width), np.int32)
  segments = np.zeros((len(rows), width), np.int32)
  for r, row in enumerate(rows):
    at = 0
    for s, w in enumerate(row, start=1):
      tokens[r, at:at + len(w)] = w
      segments[r, at:at + len(w)] = s
      at += len(w)
  return Packed(tokens, segments)
