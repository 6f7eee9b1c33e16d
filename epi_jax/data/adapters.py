"""Adapters from the paper's five Hugging Face datasets to chat turns.

``load_chats(name, source)`` loads through ``datasets.load_dataset`` (the ``data`` extra), from
the hub or from a local .jsonl/.json/.parquet file in the hub schema. Local JSON files are checked record by record
before loading, so a bad record is reported as ``file:line: problem``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

from epi_jax.data.examples import EvalExample
from epi_jax.data.records import DataError, json_records
from epi_jax.data.turns import ROLES, Turn, user_assistant
from epi_jax.extras import require


def _text(record: Mapping, key: str) -> str:
  if key not in record or record[key] is None:
    raise ValueError(f"missing field {key!r}")
  if not isinstance(record[key], str):
    raise ValueError(f"field {key!r} must be a string, got {type(record[key]).__name__}")
  return record[key]


def _gsm8k(record: Mapping) -> list[Turn]:
  return user_assistant(_text(record, "question"), _text(record, "answer"))


def _instruction(record: Mapping) -> list[Turn]:
  context = _text(record, "input")
  prompt = _text(record, "instruction") + (f"\n\n{context}" if context else "")
  return user_assistant(prompt, _text(record, "output"))


def _logiqa_choices(record: Mapping) -> tuple[tuple[str, ...], int]:
  options = record.get("options")
  if (
      not isinstance(options, list)
      or not 2 <= len(options) <= 26
      or not all(isinstance(option, str) and option for option in options)
  ):
    raise ValueError(
        f"field 'options' must be a list of 2-26 non-empty strings, got {options!r:.80}"
    )
  answer = record.get("correct_option")
  if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
    raise ValueError(
        f"field 'correct_option' must be an int in [0, {len(options)}), got {answer!r}"
    )
  return tuple(options), answer


def _logiqa(record: Mapping) -> list[Turn]:
  """lm-evaluation-harness's logiqa prompt (``utils_logiqa.doc_to_text``); the response is the
  correct option's text, the continuation its multiple-choice scoring compares."""
  options, answer = _logiqa_choices(record)
  prompt = f"Passage: {_text(record, 'context')}\nQuestion: {_text(record, 'query')}\nChoices:\n"
  prompt += "".join(f"{chr(ord('A') + i)}. {option}\n" for i, option in enumerate(options))
  return user_assistant(prompt + "Answer:", options[answer])


def _ultrachat(record: Mapping) -> list[Turn]:
  messages = record.get("messages")
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"field 'messages' must be a non-empty list, got {messages!r:.80}")
  turns = []
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping) or message.get("role") not in ROLES:
      raise ValueError(f"messages[{i}] must have a role in {ROLES}, got {message!r:.80}")
    try:
      turns.append({"role": message["role"], "content": _text(message, "content")})
    except ValueError as error:
      raise ValueError(f"messages[{i}]: {error}") from None
  if not any(turn["role"] == "assistant" for turn in turns):
    raise ValueError("field 'messages' has no assistant turn to train on")
  return turns


@dataclasses.dataclass(frozen=True)
class Adapter:
  """Where a dataset lives on the hub and how one of its records becomes chat turns."""

  hub_name: str
  hub_config: str | None
  default_split: str
  to_turns: Callable[[Mapping], list[Turn]]
  """Maps a record to turns; raises ValueError naming the offending field."""
  metric: str
  """How held-out examples are scored: a key of ``epi_jax.eval.METRICS``."""
  skill: str
  """What the dataset exercises, for the heuristic grouping: one of ``epi_jax.data.SKILLS``."""
  choices: Callable[[Mapping], tuple[tuple[str, ...], int]] | None = None
  """Multiple choice: maps a record to (options, index of the correct one)."""

  def to_example(self, record: Mapping) -> EvalExample:
    """The record's chat with what its metric needs."""
    turns = self.to_turns(record)
    return EvalExample(turns, *self.choices(record)) if self.choices else EvalExample(turns)


ADAPTERS = {
    "gsm8k": Adapter("openai/gsm8k", "main", "train", _gsm8k, "gsm8k", "reasoning"),
    "code_alpaca": Adapter(
        "sahil2801/CodeAlpaca-20k", None, "train", _instruction, "codebleu", "code"
    ),
    "logiqa": Adapter(
        "lucasmccabe/logiqa",
        None,
        "train",
        _logiqa,
        "multiple_choice",
        "reasoning",
        _logiqa_choices,
    ),
    "alpaca": Adapter("tatsu-lab/alpaca", None, "train", _instruction, "judge", "open_ended"),
    "ultrachat": Adapter(
        "HuggingFaceH4/ultrachat_200k", None, "train_sft", _ultrachat, "judge", "open_ended"
    ),
}
DATASET_NAMES = tuple(ADAPTERS)
DATASET_METRICS = {name: adapter.metric for name, adapter in ADAPTERS.items()}
DATASET_SKILLS = {name: adapter.skill for name, adapter in ADAPTERS.items()}
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _convert(adapter: Adapter, record: object, where: str) -> EvalExample:
  if not isinstance(record, Mapping):
    raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
  try:
    return adapter.to_example(record)
  except ValueError as error:
    raise DataError(f"{where}: {error}") from None


@contextlib.contextmanager
def _no_progress_bars(datasets):
  """A local file loads in a moment: no progress bars on stderr (an error stays one line)."""
  enabled = not datasets.are_progress_bars_disabled()
  datasets.disable_progress_bars()
  try:
    yield
  finally:
    if enabled:
      datasets.enable_progress_bars()


def load_chats(
    name: str,
    source: str | Path | None = None,
    *,
    split: str | None = None,
    system: str | None = None,
    cache_dir: str | None = None,
) -> list[list[Turn]]:
  """Chats of dataset ``name``: the turns of ``load_examples`` with the same arguments."""
  return [
      example.turns
      for example in load_examples(name, source, split=split, system=system, cache_dir=cache_dir)
  ]


def load_examples(
    name: str,
    source: str | Path | None = None,
    *,
    split: str | None = None,
    system: str | None = None,
    cache_dir: str | None = None,
) -> list[EvalExample]:
  """Examples of dataset ``name`` (one of ``DATASET_NAMES``) from the hub or a local file.

  Args:
    name: which adapter maps the records: gsm8k, code_alpaca, logiqa, alpaca or ultrachat.
    source: a local .jsonl, .json (array) or .parquet file in the hub schema, a hub dataset
      name in that schema, or None for the adapter's default hub dataset.
    split: hub split (default: the adapter's); ignored for local files.
    system: if given, a system turn with this text starts every chat.
    cache_dir: ``datasets`` cache folder (default: the ``datasets`` default).

  Returns:
    One EvalExample per record, in file order: its {"role", "content"} turns and, for a
    multiple-choice dataset, the options and the index of the correct one.

  Raises:
    DataError: unknown name, missing or empty file, a hub dataset that cannot be loaded, or a
      record that does not fit the schema; the message names the file and line (row for
      parquet and hub data).
    MissingExtra: the ``datasets`` package (the ``data`` extra) is not installed.
  """
  if name not in ADAPTERS:
    raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
  datasets = require("datasets", "data", f"loading the dataset {name!r} (data.source: hf)")
  from datasets.exceptions import DatasetGenerationError, DatasetsError
  from pyarrow import ArrowException  # a dependency of datasets

  adapter = ADAPTERS[name]
  path = Path(source) if source is not None else None
  if path is not None and (path.suffix in _BUILDERS or path.exists()):
    if not path.is_file():
      raise DataError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    if path.suffix not in _BUILDERS:
      raise DataError(f"{path}: unsupported file type; use .jsonl, .json or .parquet")
    if _BUILDERS[path.suffix] == "json":
      records = 0
      for line, record in json_records(path):
        _convert(adapter, record, f"{path}:{line}")
        records += 1
      if not records:
        raise DataError(f"{path}: no records")
    try:
      with _no_progress_bars(datasets):
        rows = datasets.load_dataset(
            _BUILDERS[path.suffix], data_files=str(path), split="train", cache_dir=cache_dir
        )
    except (ArrowException, DatasetGenerationError) as error:
      raise DataError(f"{path}: cannot load: {error}") from None
    where = f"{path} row"
  else:
    hub_name = adapter.hub_name if source is None else str(source)
    split = split or adapter.default_split
    config = adapter.hub_config if source is None else None
    try:
      rows = datasets.load_dataset(hub_name, config, split=split, cache_dir=cache_dir)
    except (DatasetsError, ConnectionError, FileNotFoundError) as error:
      raise DataError(
          f"{hub_name}[{split}]: cannot load from the Hugging Face hub: {error}"
      ) from None
    where = f"{hub_name}[{split}] row"
  if not len(rows):
    raise DataError(f"{where.removesuffix(' row')}: no records")
  examples = [_convert(adapter, row, f"{where} {i}") for i, row in enumerate(rows)]
  if system is not None:
    examples = [
        example._replace(turns=[{"role": "system", "content": system}, *example.turns])
        for example in examples
    ]
  return examples
