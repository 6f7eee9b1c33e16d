"""Deterministic, resumable batch iterator over tokenized examples."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from epi_jax.data.batching import Encoded, make_batch


@dataclasses.dataclass(frozen=True)
class IteratorState:
  """Position of a BatchIterator: save it with the checkpoint (``dataclasses.asdict``)."""

  epoch: int = 0
  """Pass over the data; each epoch has its own shuffled order."""
  index: int = 0
  """How many examples of this epoch's order the batches so far have used."""


class BatchIterator:
  """Endless batches over ``examples``, shuffled per epoch by (seed, epoch).

  Batches are always full: the last examples of an epoch share a batch with the first of the
  next. Examples longer than ``seq_len`` are cut to ``seq_len`` tokens. With ``pack=False`` each
  row holds one example; with ``pack=True`` rows are filled greedily, in order, with as many
  examples as fit. Restoring a saved ``state`` on the same examples and settings gives the
  same following batches. See ``make_batch`` for the batch format.

  Example::

    it = BatchIterator(examples, batch_size=8, seq_len=128, pad_id=0, seed=0)
    batch = next(it)
    saved = dataclasses.asdict(it.state)  # {"epoch": 0, "index": 8}
    resumed = BatchIterator(examples, batch_size=8, seq_len=128, pad_id=0, seed=0,
                            state=IteratorState(**saved))  # next(resumed) == next(it)
  """

  def __init__(
      self,
      examples: Sequence[Encoded],
      *,
      batch_size: int,
      seq_len: int,
      pad_id: int,
      seed: int,
      pack: bool = False,
      shuffle: bool = True,
      state: IteratorState = IteratorState(),
  ):
    if not examples:
      raise ValueError("a BatchIterator needs at least one example")
    if batch_size < 1 or seq_len < 2:
      raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")
    if seed < 0:
      raise ValueError(f"seed must be >= 0, got {seed}")
    self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
    self.pad_id, self.seed, self.pack, self.shuffle = pad_id, seed, pack, shuffle
    self.restore(state)

  @property
  def state(self) -> IteratorState:
    """Where the next batch starts."""
    return IteratorState(self._epoch, self._index)

  def restore(self, state: IteratorState) -> None:
    """Continue from ``state``, as saved from ``self.state``."""
    if state.epoch < 0 or not 0 <= state.index <= len(self.examples):
      raise ValueError(f"{state} does not fit {len(self.examples)} examples")
    self._epoch, self._index = state.epoch, state.index
    self._order = self._epoch_order(state.epoch)

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(len(self.examples))
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

  def _peek(self) -> Encoded:
    if self._index == len(self.examples):
      self._epoch, self._index = self._epoch + 1, 0
      self._order = self._epoch_order(self._epoch)
    ids, mask = self.examples[self._order[self._index]]
    return Encoded(ids[: self.seq_len], mask[: self.seq_len])

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows: list[list[Encoded]] = []
    used = self.seq_len
    while True:
      example = self._peek()
      if self.pack and used + len(example.input_ids) <= self.seq_len:
        rows[-1].append(example)
      elif len(rows) < self.batch_size:
        rows.append([example])
        used = 0
      else:
        break
      used += len(example.input_ids)
      self._index += 1
    return make_batch(rows, seq_len=self.seq_len, pad_id=self.pad_id)
