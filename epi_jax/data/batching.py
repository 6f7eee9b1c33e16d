"""Token examples and the fixed-shape batches the trainer consumes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np

from epi_jax.data.turns import Turn


class Encoded(NamedTuple):
  """One tokenized chat."""

  input_ids: np.ndarray  # shape=(T,), dtype=int32
  loss_mask: np.ndarray  # shape=(T,), dtype=bool; True on response tokens


class ChatEncoder(Protocol):
  """What ByteTokenizer and ChatTemplateEncoder share."""

  pad_id: int
  eos_id: int

  def encode_chat(self, turns: Sequence[Turn]) -> tuple[np.ndarray, np.ndarray]:
    ...

  def encode_prompt(self, turns: Sequence[Turn]) -> np.ndarray:
    ...

  def encode_completion(
      self, turns: Sequence[Turn], completion: str
  ) -> tuple[np.ndarray, np.ndarray]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


def encode_chats(chats: Sequence[Sequence[Turn]], encoder: ChatEncoder) -> list[Encoded]:
  """Tokenize every chat with ``encoder``."""
  return [Encoded(*encoder.encode_chat(chat)) for chat in chats]


def make_batch(
    rows: Sequence[Sequence[Encoded]], *, seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
  """Lay out rows of examples (one example per row = padding; several = packing).

  Each row's examples are placed one after another from position 0, then padded with
  ``pad_id`` to ``seq_len``; a row's examples must fit in ``seq_len`` together.

  Returns a dict of numpy arrays, each [B, T] with B = len(rows) and T = seq_len:
    input_ids: int32 token ids.
    loss_mask: float32, 1 where input_ids[b, t] is a response token the model must predict.
      Targets are input_ids shifted left: logits[:, t] predict input_ids[:, t + 1], so the
      loss is cross_entropy(logits[:, :-1], input_ids[:, 1:]) weighted by loss_mask[:, 1:].
      The first token of every example has weight 0, so no loss crosses from one packed
      example into the next.
    attention_mask: int32, 1 on real tokens, 0 on padding.
    segment_ids: int32, k on the tokens of the row's k-th example (1-based), 0 on padding;
      attention must stay within a segment (q_seg == k_seg) when rows are packed.
    positions: int32, position of each token within its own example (0 on padding).
  """
  batch = {
      key: np.zeros((len(rows), seq_len), np.int32)
      for key in ("input_ids", "attention_mask", "segment_ids", "positions")
  }
  batch["input_ids"][:] = pad_id
  batch["loss_mask"] = np.zeros((len(rows), seq_len), np.float32)
  for b, row in enumerate(rows):
    start = 0
    for segment, example in enumerate(row, start=1):
      end = start + len(example.input_ids)
      if end > seq_len:
        raise ValueError(f"row {b} holds {end} tokens, more than seq_len={seq_len}")
      batch["input_ids"][b, start:end] = example.input_ids
      batch["loss_mask"][b, start + 1 : end] = example.loss_mask[1:]
      batch["attention_mask"][b, start:end] = 1
      batch["segment_ids"][b, start:end] = segment
      batch["positions"][b, start:end] = np.arange(end - start)
      start = end
  return batch
