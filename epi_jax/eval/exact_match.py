"""Exact-match accuracy of greedy generations on held-out chats (the embedded tasks' metric)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

import epi_jax.data as data
from epi_jax.models.generate import generate


def _left_pad(prompts: Sequence[np.ndarray], rows: int, length: int, pad_id: int):
  ids = np.full((rows, length), pad_id, np.int32)
  mask = np.zeros((rows, length), np.int32)
  for b, p in enumerate(prompts):
    p = p[-length:]
    ids[b, length - len(p):] = p
    mask[b, length - len(p):] = 1
  return ids, mask


def _matches(encoder: data.ChatEncoder, ids: np.ndarray, target: str) -> bool:
  """Exact match of the decoded ids; an id the tokenizer cannot decode (a model vocabulary
  larger than the tokenizer's) makes the answer wrong."""
  try:
    text = encoder.decode([int(t) for t in ids if t != encoder.pad_id])
  except ValueError:
    return False
  return data.exact_match(text, target)


def task_accuracy(model, encoder: data.ChatEncoder, chats: Sequence[Sequence[data.Turn]], *,
                  max_new_tokens: int, batch_size: int, prompt_len: int) -> float:
  """Fraction of `chats` whose final assistant turn equals the greedy continuation of the rest.

  Every call uses [batch_size, prompt_len] prompts (left padded, cut on the left if longer),
  so one compiled program serves all tasks.
  """
  prompts = [encoder.encode_prompt(chat[:-1]) for chat in chats]
  hits = 0
  for start in range(0, len(chats), batch_size):
    part = prompts[start:start + batch_size]
    ids, mask = _left_pad(part, batch_size, prompt_len, encoder.pad_id)
    out = np.asarray(generate(model, ids, mask, max_new_tokens=max_new_tokens,
                              eos_token_id=encoder.eos_id, pad_token_id=encoder.pad_id))
    for row, chat in zip(out, chats[start:start + batch_size]):
      hits += _matches(encoder, row, chat[-1]["content"])
  return hits / max(len(chats), 1)


def evaluate(model, encoder: data.ChatEncoder, tasks: Mapping[str, Sequence[Sequence[data.Turn]]],
             *, max_new_tokens: int, batch_size: int) -> dict[str, float]:
  """Exact-match accuracy of every task, with one prompt length for all of them."""
  prompt_len = max(len(encoder.encode_prompt(chat[:-1])) for chats in tasks.values()
                   for chat in chats)
  return {name: task_accuracy(model, encoder, chats, max_new_tokens=max_new_tokens,
                              batch_size=min(batch_size, max(len(c) for c in tasks.values())),
                              prompt_len=prompt_len)
          for name, chats in tasks.items()}
