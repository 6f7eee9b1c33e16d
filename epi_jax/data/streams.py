"""Task streams: the stages (given, random or by skill), one batch iterator per stage, or one
mixture of all tasks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from epi_jax.data.batching import Encoded
from epi_jax.data.iterator import PACK_WINDOW, BatchIterator


def check_stages(task_names: Sequence[str], stages: Sequence[Sequence[str]]) -> None:
  """Raise ValueError unless every stage is non-empty and each known task is used at most once."""
  seen: set[str] = set()
  for k, stage in enumerate(stages):
    if isinstance(stage, str) or not stage:
      raise ValueError(f"stage {k} must be a non-empty list of task names, got {stage!r}")
    for task in stage:
      if task not in task_names:
        raise ValueError(f"stage {k} names unknown task {task!r}; known: {', '.join(task_names)}")
      if task in seen:
        raise ValueError(f"task {task!r} appears in more than one stage")
      seen.add(task)


def random_grouping(task_names: Sequence[str], num_stages: int, *, seed: int) -> list[list[str]]:
  """Shuffle the tasks by ``seed`` and deal them into ``num_stages`` stages of near-equal size."""
  if not 1 <= num_stages <= len(task_names):
    raise ValueError(f"num_stages must be in [1, {len(task_names)}], got {num_stages}")
  order = np.random.default_rng(seed).permutation(len(task_names))
  return [[task_names[i] for i in part] for part in np.array_split(order, num_stages)]


SKILLS = ("reasoning", "code", "open_ended")
"""The skills of the heuristic grouping (Section 3.2), in stage order; each task and dataset
names its own (``TASK_SKILLS``, ``DATASET_SKILLS``)."""


def skill_grouping(task_names: Sequence[str], skills: Mapping[str, str]) -> list[list[str]]:
  """One stage per skill in ``SKILLS`` order with its tasks in the given order; a task that
  ``skills`` does not list is a stage of its own, after them."""
  stages = [[task for task in task_names if skills.get(task) == skill] for skill in SKILLS]
  return [stage for stage in stages if stage] + [
      [task] for task in task_names if skills.get(task) not in SKILLS
  ]


def stage_iterators(
    examples: Mapping[str, Sequence[Encoded]],
    stages: Sequence[Sequence[str]],
    *,
    batch_size: int,
    seq_len: int,
    pad_id: int,
    seed: int,
    pack: bool = False,
    pack_window: int = PACK_WINDOW,
) -> list[BatchIterator]:
  """One iterator per stage over the union of that stage's tasks (multi-stage training).

  Within a stage the tasks' examples are shuffled together, so a batch mixes them in
  proportion to their sizes. Stage k's order depends only on (seed, k) and its tasks.

  Args:
    examples: tokenized training examples per task name.
    stages: lists of task names, trained in this order; e.g. [["arithmetic"], ["rewrite",
      "dialogue"]].
    batch_size, seq_len, pad_id, pack, pack_window: as for BatchIterator.
    seed: base seed; each stage gets its own derived seed.
  """
  check_stages(list(examples), stages)
  return [
      BatchIterator(
          [example for task in stage for example in examples[task]],
          batch_size=batch_size,
          seq_len=seq_len,
          pad_id=pad_id,
          pack=pack,
          pack_window=pack_window,
          seed=int(np.random.SeedSequence([seed, k]).generate_state(1)[0]),
      )
      for k, stage in enumerate(stages)
  ]


def mixture_iterator(
    examples: Mapping[str, Sequence[Encoded]],
    *,
    batch_size: int,
    seq_len: int,
    pad_id: int,
    seed: int,
    pack: bool = False,
    pack_window: int = PACK_WINDOW,
) -> BatchIterator:
  """One iterator over all tasks shuffled together: the "full" multi-task baseline."""
  return stage_iterators(
      examples,
      [list(examples)],
      batch_size=batch_size,
      seq_len=seq_len,
      pad_id=pad_id,
      seed=seed,
      pack=pack,
      pack_window=pack_window,
  )[0]
