"""Chat turns: the common form of every example, and their validation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

ROLES = ("system", "user", "assistant")


class Turn(TypedDict):
  """One chat message; an assistant turn is a response the model is trained to produce."""

  role: str
  content: str


def check_turns(turns: Sequence[Turn]) -> None:
  """Raise ValueError unless ``turns`` is a non-empty list of {role, content} string dicts."""
  if not isinstance(turns, (list, tuple)) or not turns:
    raise ValueError(f"a chat must be a non-empty list of turns, got {turns!r:.80}")
  for i, turn in enumerate(turns):
    if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
      raise ValueError(f"turn {i} must be a dict with keys 'role' and 'content', got {turn!r:.80}")
    if turn["role"] not in ROLES:
      raise ValueError(f"turn {i} has role {turn['role']!r}; expected one of {ROLES}")
    if not isinstance(turn["content"], str):
      raise ValueError(f"turn {i} content must be a string, got {type(turn['content']).__name__}")


def user_assistant(user: str, assistant: str) -> list[Turn]:
  """A one-exchange chat: the user's turn, then the assistant's response."""
  return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
