"""Collectives of a compiled HLO module: what a sharded step communicates."""
from __future__ import annotations

import math
import re

_COLLECTIVE = re.compile(
    r"=\s*(\(?[a-z0-9\[\]{}, ]*?\)?)\s*(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)"
    r"(?:-start)?\(")
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_ITEM_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2,
               "u16": 2, "s8": 1, "u8": 1, "pred": 1}


def collectives(hlo_text: str) -> list[tuple[str, int, list[tuple[str, tuple[int, ...]]]]]:
  """[(kind, result bytes, [(dtype, shape)])] for every collective in `compiled.as_text()` (per device)."""
  found = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    shapes = [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(m.group(1))]
    nbytes = sum(_ITEM_BYTES.get(dt, 4) * math.prod(s) for dt, s in shapes)
    found.append((m.group(2), nbytes, shapes))
  return found


def collective_bytes(hlo_text: str) -> int:
  """Sum of the result sizes of all collectives of one device's program."""
  return sum(nbytes for _, nbytes, _ in collectives(hlo_text))
