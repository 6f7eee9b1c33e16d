"""Line-numbered reading of local JSON and JSON Lines files, for precise error messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from epi_jax.errors import InputError


class DataError(InputError, ValueError):
  """A data file or record that cannot be used; the message starts with where it is."""


def json_records(path: Path) -> Iterator[tuple[int, object]]:
  """Yield (line number, parsed value) for each record of a .jsonl file or a .json array.

  Blank lines of a .jsonl file are skipped; a line that is not valid JSON raises DataError
  naming the file and line.
  """
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as error:
    raise DataError(f"{path}: cannot read: {error}") from None
  if path.suffix == ".jsonl":
    # Lines end at "\n" only: str.splitlines would also split inside a record at U+2028,
    # U+0085 and the like, which JSON strings may hold unescaped (GSM8K's train file does).
    for number, line in enumerate(text.split("\n"), start=1):
      if not line.strip():
        continue
      try:
        yield number, json.loads(line)
      except json.JSONDecodeError as error:
        raise DataError(f"{path}:{number}: invalid JSON: {error.msg}") from None
    return
  yield from _array_records(path, text)


def _array_records(path: Path, text: str) -> Iterator[tuple[int, object]]:
  decoder = json.JSONDecoder()

  def skip_space(i: int) -> int:
    while i < len(text) and text[i].isspace():
      i += 1
    return i

  def line_of(i: int) -> int:
    return text.count("\n", 0, i) + 1

  i = skip_space(0)
  if not text.startswith("[", i):
    raise DataError(f"{path}:{line_of(i)}: a .json file must hold one JSON array of records")
  i = skip_space(i + 1)
  if text.startswith("]", i):
    return
  while True:
    try:
      value, end = decoder.raw_decode(text, i)
    except json.JSONDecodeError as error:
      raise DataError(f"{path}:{line_of(error.pos)}: invalid JSON: {error.msg}") from None
    yield line_of(i), value
    i = skip_space(end)
    if text.startswith("]", i):
      break
    if not text.startswith(",", i):
      raise DataError(f"{path}:{line_of(i)}: expected ',' or ']' after a record")
    i = skip_space(i + 1)
  if skip_space(i + 1) != len(text):
    raise DataError(f"{path}:{line_of(i + 1)}: unexpected text after the array")
