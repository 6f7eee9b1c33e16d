"""The config reference of docs/trainer.md, generated from ``epi_jax.train.config``.

Each field's row comes from the dataclass: its type, default, choices (``Literal``), range
(``bounded`` metadata) and the string literal under it. Regenerate the table with

  python -m epi_jax.train.config_docs --write docs/trainer.md

which rewrites only the text between the START and END marker comments.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import textwrap
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from epi_jax.train.config import Config
from epi_jax.train.methods import METHODS

START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"
COMMAND = "python -m epi_jax.train.config_docs --write docs/trainer.md"
_SIGNS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
# Keys typed `str` whose choices are checked against a registry rather than a Literal.
_REGISTRY_CHOICES = {"method.type": tuple(METHODS)}


def field_docs(cls: type) -> dict[str, str]:
  """Each field of dataclass ``cls`` mapped to the string literal under it, on one line.

  Raises:
    ValueError: naming every field of ``cls`` that has no string literal under it.
  """
  tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
  body = next(node for node in tree.body if isinstance(node, ast.ClassDef)).body
  docs = {}
  for node, after in zip(body, body[1:]):
    if (
        isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and isinstance(after, ast.Expr)
        and isinstance(after.value, ast.Constant)
        and isinstance(after.value.value, str)
    ):
      docs[node.target.id] = " ".join(after.value.value.split())
  missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
  if missing:
    raise ValueError(
        f"{cls.__module__}.{cls.__qualname__}: no docstring under the field(s) "
        f"{', '.join(missing)}"
    )
  return docs


def _yaml(value: Any) -> str:
  """``value`` as it is written in a YAML config."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, str):
    return value or '""'
  if isinstance(value, list):
    return "[" + ", ".join(map(_yaml, value)) + "]"
  if isinstance(value, dict):
    return "{" + ", ".join(f"{_yaml(k)}: {_yaml(v)}" for k, v in value.items()) + "}"
  return repr(value)


def _type_name(kind: Any) -> str:
  origin, args = typing.get_origin(kind), typing.get_args(kind)
  if origin is typing.Literal:
    return type(args[0]).__name__
  if origin in (list, dict):
    return f"{origin.__name__}[{', '.join(map(_type_name, args))}]"
  return kind.__name__


def _allowed(kind: Any, bounds: Mapping[str, Any]) -> str:
  """The choices of a Literal (or a list of one) and the range bounds, as Markdown."""
  origin, args = typing.get_origin(kind), typing.get_args(kind)
  if origin is list and typing.get_origin(args[0]) is typing.Literal:
    return "each of " + _allowed(args[0], {})
  if origin is typing.Literal:
    return ", ".join(f"`{_yaml(choice)}`" for choice in args)
  return ", ".join(f"`{_SIGNS[name]} {_yaml(bound)}`" for name, bound in bounds.items())


def _cell(text: str) -> str:
  """``text`` safe in a table cell: pipes escaped, and ``<`` outside code spans (else <run_dir>
  would read as an HTML tag)."""
  parts = re.split(r"(`[^`]*`)", text.replace("|", "\\|"))
  return "".join(p if p.startswith("`") else p.replace("<", "&lt;") for p in parts)


def _tables(cls: type, prefix: str, title: str, doc: str) -> list[str]:
  """Markdown of section ``cls``: its own fields' table, then one per nested section."""
  hints, docs = typing.get_type_hints(cls), field_docs(cls)
  rows, nested = [], []
  for f in dataclasses.fields(cls):
    kind, key = hints[f.name], prefix + f.name
    if dataclasses.is_dataclass(kind):
      nested += _tables(kind, key + ".", f"`{key}`", docs[f.name])
      continue
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if key in _REGISTRY_CHOICES:
      kind = typing.Literal[_REGISTRY_CHOICES[key]]
    rows.append(
        f"| `{key}` | `{_type_name(kind)}` | `{_yaml(default)}` | "
        f"{_allowed(kind, f.metadata)} | {_cell(docs[f.name])} |"
    )
  head = [f"### {title}", ""] + ([_cell(doc), ""] if doc else [])
  table = ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
  return (head + table + rows + [""] if rows else []) + nested


def render(config_cls: type = Config) -> str:
  """The Markdown reference of every key of ``config_cls``, one table per section."""
  return "\n".join(_tables(config_cls, "", "Top level", "")).rstrip("\n") + "\n"


def _span(document: str, where: str) -> tuple[int, int]:
  """Start and end offsets of the text between the markers of ``document``."""
  starts, ends = document.count(START), document.count(END)
  if starts != 1 or ends != 1 or document.index(START) > document.index(END):
    raise ValueError(
        f"{where}: needs one line {START} followed by one line {END}; "
        f"found {starts} start and {ends} end marker(s)"
    )
  return document.index(START) + len(START), document.index(END)


def generated_part(document: str, where: str = "document") -> str:
  """The text between the markers of ``document``, without the newlines next to them."""
  begin, end = _span(document, where)
  return document[begin:end].strip("\n") + "\n"


def splice(document: str, table: str, where: str = "document") -> str:
  """``document`` with the text between its markers replaced by ``table``."""
  begin, end = _span(document, where)
  return document[:begin] + "\n" + table + document[end:]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--write",
      metavar="PATH",
      help="rewrite the table between the markers of PATH (else print it)",
  )
  args = parser.parse_args(argv)
  table = render()
  if not args.write:
    sys.stdout.write(table)
    return 0
  with open(args.write) as f:
    document = f.read()
  try:
    updated = splice(document, table, args.write)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  if updated != document:
    with open(args.write, "w") as f:
      f.write(updated)
  print(f"{args.write}: config table {'rewritten' if updated != document else 'up to date'}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
