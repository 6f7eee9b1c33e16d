"""Best-fit-decreasing packing of example lengths into rows of a fixed capacity."""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def best_fit_decreasing(
    lengths: Sequence[int], capacity: int, open_rows: Sequence[Sequence[int]] = ()
) -> list[list[int]]:
  """Rows of item indices whose lengths sum to at most ``capacity`` each.

  Items are placed longest first (ties: lower index first), each into the fullest row that
  still has room for it (ties: the row opened first), else into a new row. ``open_rows`` are
  rows already holding items (indices into ``lengths``) that the other items may join; they
  come first in the result, in their order, then the new rows in the order they were opened.
  The placement depends only on the lengths, so equal inputs give equal rows.
  """
  rows = [list(row) for row in open_rows]
  placed = {i for row in rows for i in row}
  free = []  # (room left, row number), kept sorted: the first with room >= n is the fullest fit
  for r, row in enumerate(rows):
    room = capacity - sum(lengths[i] for i in row)
    if room < 0:
      raise ValueError(f"open row {r} holds {capacity - room} tokens, more than {capacity}")
    bisect.insort(free, (room, r))
  for i in sorted((i for i in range(len(lengths)) if i not in placed), key=lambda i: -lengths[i]):
    n = lengths[i]
    if not 0 < n <= capacity:
      raise ValueError(f"item {i} has length {n}, outside [1, {capacity}]")
    k = bisect.bisect_left(free, (n, -1))
    if k == len(free):
      rows.append([i])
      room, r = capacity, len(rows) - 1
    else:
      room, r = free.pop(k)
      rows[r].append(i)
    bisect.insort(free, (room - n, r))
  return rows
