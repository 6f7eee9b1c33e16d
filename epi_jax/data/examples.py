"""Held-out evaluation examples: a chat plus what its task's metric needs."""

from __future__ import annotations

from typing import NamedTuple

from epi_jax.data.turns import Turn


class EvalExample(NamedTuple):
  """One held-out chat; the last turn is the reference response.

  Multiple-choice examples (LogiQA) also carry the options scored by likelihood and the
  index of the correct one; their reference response is that option's text.
  """

  turns: list[Turn]
  choices: tuple[str, ...] = ()
  answer: int = -1

  @property
  def prompt(self) -> list[Turn]:
    """The turns the model is given: all but the reference response."""
    return self.turns[:-1]

  @property
  def reference(self) -> str:
    """The reference response."""
    return self.turns[-1]["content"]
