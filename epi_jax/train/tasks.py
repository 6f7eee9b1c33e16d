"""The task stream of a run: tokenized examples, held-out chats, stages and their lengths."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import epi_jax.data as data
from epi_jax.eval.metrics import METRICS
from epi_jax.models import CheckpointError, load_tokenizer
from epi_jax.train.config import Config


@dataclasses.dataclass(frozen=True)
class TaskData:
  """Everything the loop needs from the data layer."""

  encoder: data.ChatEncoder
  train: dict[str, list[data.Encoded]]  # task -> tokenized training examples
  evaluation: dict[str, list[data.EvalExample]]  # task -> held-out examples
  metrics: dict[str, str]  # task -> its metric (a key of epi_jax.eval.METRICS)
  probes: dict[str, list[data.EvalExample]] = dataclasses.field(default_factory=dict)
  """probe task (``eval.probe_tasks``, never trained) -> its held-out examples."""
  left_out: dict[str, int] = dataclasses.field(default_factory=dict)
  """task -> training examples left out: their response would start past ``data.seq_len``."""


def _encoder(config: Config) -> data.ChatEncoder:
  if config.data.source == "synthetic":
    return data.ByteTokenizer()
  return _chat_encoder(config.model.checkpoint)


def _splits(config: Config, task: str) -> tuple[list[list[data.Turn]], list[data.EvalExample]]:
  """(training chats, held-out examples) of ``task``; the held-out ones depend on the data
  config alone (synthetic: ``data.seed`` and ``n_eval``; hf: the rows after the first
  ``skip + n_train``, or with ``shuffle`` a draw by ``data.seed``)."""
  d = config.data
  if d.source == "synthetic":
    try:
      train, held_out = data.task_splits(task, seed=d.seed, n_train=d.n_train, n_eval=d.n_eval)
    except ValueError as error:  # too few distinct prompts for n_train + n_eval
      raise data.DataError(f"data.n_train, data.n_eval: {error}") from None
    return train, [data.EvalExample(chat) for chat in held_out]
  examples = data.load_examples(task, d.files.get(task))
  if len(examples) <= d.skip + d.n_train:
    raise data.DataError(
        f"{d.files.get(task, task)}: {len(examples)} records leave none to evaluate: the "
        f"held-out rows follow data.skip={d.skip} and data.n_train={d.n_train}"
    )
  examples = examples[d.skip : d.skip + d.n_train + d.n_eval]
  if d.shuffle:
    examples = [examples[i] for i in np.random.default_rng(d.seed).permutation(len(examples))]
  return [e.turns for e in examples[: d.n_train]], examples[d.n_train :]


def probe_examples(config: Config, task: str) -> list[data.EvalExample]:
  """The held-out examples of probe task ``task`` (no stage trains it): the first ``n_eval``
  (synthetic: its eval split, as a stream task's; hf: the file's first rows, so a small
  local file serves)."""
  d = config.data
  if d.source == "synthetic":
    return _splits(config, task)[1]
  return data.load_examples(task, d.files.get(task))[: d.n_eval]


def load_tasks(config: Config) -> TaskData:
  """Tokenized training examples and evaluation chats of every task in ``config.data.tasks``,
  and the held-out examples of every probe task of ``config.eval.probe_tasks``. Training
  examples whose response would start past ``data.seq_len`` are left out (``left_out``).

  Raises:
    DataError: a data file or hub dataset that cannot be used, too few records, or no
      training example of a task with its response inside ``data.seq_len``.
    CheckpointError: data.source=hf and the checkpoint's tokenizer cannot encode chats.
    MissingExtra: a task's metric or the data source needs an extra that is not installed.
  """
  d = config.data
  table = data.TASK_METRICS if d.source == "synthetic" else data.DATASET_METRICS
  metrics = {t: table[t] for t in [*d.tasks, *config.eval.probe_tasks]}
  for name in sorted(set(metrics.values())):
    if METRICS[name].requires is not None:
      METRICS[name].requires()
  encoder = _encoder(config)
  splits = {t: _splits(config, t) for t in d.tasks}
  train, left_out = {}, {}
  for t, (chats, _) in splits.items():
    encoded = data.encode_chats(chats, encoder)
    train[t] = [e for e in encoded if e.loss_mask[: d.seq_len].any()]
    left_out[t] = len(encoded) - len(train[t])
    if not train[t]:
      raise data.DataError(
          f"data.seq_len={d.seq_len}: every training example of {t} has its response past "
          f"token {d.seq_len}; raise data.seq_len"
      )
  return TaskData(
      encoder=encoder,
      train=train,
      evaluation={t: ev for t, (_, ev) in splits.items()},
      metrics=metrics,
      probes={t: probe_examples(config, t) for t in config.eval.probe_tasks},
      left_out={t: n for t, n in left_out.items() if n},
  )


def _chat_encoder(checkpoint: str) -> data.ChatTemplateEncoder:
  """The chat encoder of the checkpoint's tokenizer."""
  if not checkpoint:
    raise CheckpointError("model.checkpoint: data.source=hf needs a checkpoint (its tokenizer)")
  tokenizer = load_tokenizer(checkpoint)
  if tokenizer is None:
    raise CheckpointError(
        f"{checkpoint}: no tokenizer files (tokenizer.json, tokenizer_config.json or "
        "tokenizer.model); data.source=hf encodes the chats with them"
    )
  try:
    return data.ChatTemplateEncoder(tokenizer)
  except ValueError as error:  # not a fast tokenizer, or neither a chat template nor eos
    raise CheckpointError(f"{checkpoint}: tokenizer: {error}") from None


def steps_per_stage(config: Config, stages: list[list[str]], task_data: TaskData) -> list[int]:
  """Optimizer steps of each stage: ``train.steps_per_stage``, else ``train.epochs`` passes."""
  if config.train.steps_per_stage:
    return [config.train.steps_per_stage] * len(stages)
  sizes = [sum(len(task_data.train[t]) for t in stage) for stage in stages]
  return [max(1, math.ceil(config.train.epochs * n / config.optim.batch_size)) for n in sizes]


def stage_iterators(
    config: Config, stages: list[list[str]], task_data: TaskData
) -> list[data.BatchIterator]:
  """One resumable batch iterator per stage."""
  d = config.data
  return data.stage_iterators(
      task_data.train,
      stages,
      batch_size=config.optim.batch_size,
      seq_len=d.seq_len,
      pad_id=task_data.encoder.pad_id,
      seed=d.seed,
      pack=d.pack,
      pack_window=d.pack_window,
  )
