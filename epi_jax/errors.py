"""Bad user input: one exception family, and its one-line report at the command line.

Every loader of something a user hands in (a config, a data file, a checkpoint, a tokenizer, a
run directory) raises a subclass of ``InputError`` whose message starts with where the problem
is (file, line, field or tensor). The command-line entry points wrap their ``main`` in
``input_errors_exit``: an ``InputError`` becomes ``error: <message>`` on one line of stderr and
exit code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

EXIT_INPUT = 2
"""Exit code of a command refused for bad input."""


class InputError(Exception):
  """Input a user supplied cannot be used; the message starts with where it is."""


def one_line(error: InputError) -> str:
  """The message on one line: a line ending with ``:`` runs into the next, others take ``; ``."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  out = lines[0] if lines else type(error).__name__
  for line in lines[1:]:
    out += (" " if out.endswith(":") else "; ") + line
  return out


def input_errors_exit(main: Callable[..., int | None]) -> Callable[..., int]:
  """``main`` returning exit code 2 after one ``error: ...`` line on stderr for an InputError."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs) -> int:
    try:
      return main(*args, **kwargs) or 0
    except InputError as error:
      print(f"error: {one_line(error)}", file=sys.stderr)
      return EXIT_INPUT

  return wrapped
