"""The task stream of a run: tokenized examples, held-out chats, stages and their lengths."""

from __future__ import annotations

import dataclasses
import math

import epi_jax.data as data
from epi_jax.models import CheckpointError, load_tokenizer
from epi_jax.train.config import Config


@dataclasses.dataclass(frozen=True)
class TaskData:
  """Everything the loop needs from the data layer."""

  encoder: data.ChatEncoder
  train: dict[str, list[data.Encoded]]  # task -> tokenized training examples
  evaluation: dict[str, list[data.EvalExample]]  # task -> held-out examples
  metrics: dict[str, str]  # task -> its metric (a key of epi_jax.eval.METRICS)


def load_tasks(config: Config) -> TaskData:
  """Tokenized training examples and evaluation chats of every task in ``config.data.tasks``.

  Raises:
    DataError: a data file or hub dataset that cannot be used, or too few records.
    CheckpointError: data.source=hf and the checkpoint's tokenizer cannot encode chats.
  """
  d = config.data
  if d.source == "synthetic":
    encoder = data.ByteTokenizer()
    splits = {}
    for t in d.tasks:
      try:
        train, held_out = data.task_splits(t, seed=d.seed, n_train=d.n_train, n_eval=d.n_eval)
      except ValueError as error:  # too few distinct prompts for n_train + n_eval
        raise data.DataError(f"data.n_train, data.n_eval: {error}") from None
      splits[t] = (train, [data.EvalExample(chat) for chat in held_out])
    metrics = {t: data.TASK_METRICS[t] for t in d.tasks}
  else:
    encoder = _chat_encoder(config.model.checkpoint)
    splits = {}
    for t in d.tasks:
      examples = data.load_examples(t, d.files.get(t))
      if len(examples) <= d.n_train:
        raise data.DataError(
            f"{d.files.get(t, t)}: {len(examples)} records leave none to evaluate: the "
            f"held-out rows follow the first data.n_train={d.n_train}"
        )
      splits[t] = (
          [e.turns for e in examples[: d.n_train]],
          examples[d.n_train : d.n_train + d.n_eval],
      )
    metrics = {t: data.DATASET_METRICS[t] for t in d.tasks}
  return TaskData(
      encoder=encoder,
      train={t: data.encode_chats(tr, encoder) for t, (tr, _) in splits.items()},
      evaluation={t: ev for t, (_, ev) in splits.items()},
      metrics=metrics,
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
