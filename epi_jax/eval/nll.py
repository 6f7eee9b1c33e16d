"""Loss-based forgetting: held-out response negative log-likelihood per example, its per-task
matrix over the evaluation points of a run, and the forgetting and BWT read from that matrix.

An example's NLL is the trainer's loss on it alone: the summed cross-entropy (nats) of its
response tokens (the encoder's loss mask: every assistant turn and its end token) and their
count; a task's NLL at a point is the mean over its examples of nll_sum / tokens (examples
whose response was cut away entirely are left out), so a mean of per-example paired
differences (``epi_jax.eval.paired``) is a difference of these entries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

import epi_jax.data as data
from epi_jax.eval.continual import continual_summary
from epi_jax.eval.generation import row_loglikelihoods

Scores = Sequence[Sequence[float]]
"""One task's per-example ``[nll_sum, tokens]`` pairs."""


def response_nlls(
    model, encoder: data.ChatEncoder, chats: Sequence[Sequence[data.Turn]], *, batch_size: int
) -> list[list[float]]:
  """Per chat, ``[nll_sum, tokens]``: the summed response-token NLL (nats) and the token count.

  Forward passes only, rows batched by length bucket (``generation.row_loglikelihoods``); a
  chat longer than the model's ``max_position_embeddings`` keeps its first tokens.
  """
  limit = model.config.max_position_embeddings
  rows = []
  for chat in chats:
    ids, mask = encoder.encode_chat(chat)
    rows.append((ids[:limit], mask[:limit].astype(bool)))
  sums = row_loglikelihoods(model, rows, pad_id=encoder.pad_id, batch_size=batch_size)
  return [[-float(s), int(mask[1:].sum())] for s, (_, mask) in zip(sums, rows)]


def task_nll(scores: Scores) -> float | None:
  """Mean over examples with response tokens of nll_sum / tokens (None if there are none)."""
  per_token = [s / n for s, n in scores if n > 0]
  return float(np.mean(per_token)) if per_token else None


def nll_row(point: Mapping[str, Scores]) -> dict[str, float | None]:
  """task -> ``task_nll`` at one evaluation point."""
  return {task: task_nll(scores) for task, scores in point.items()}


def nll_forgetting(
    before: Mapping[str, float | None],
    matrix: Sequence[Mapping[str, float | None]],
    stages: Sequence[Sequence[str]],
) -> dict:
  """Forgetting and BWT on the NLL matrix (rows: after each finished stage; higher is worse).

  With K finished stages and s(t) the stage that trains task t:

  - ``forgetting[t]`` = NLL[K-1][t] - NLL[s(t)][t], nats per token: how far the loss rose from
    the end of t's own stage to the end of the stream (None for the tasks of the last stage);
  - ``bwt`` = GEM's BWT on the NLL matrix, the mean of ``forgetting`` over s(t) < K-1
    (positive: the loss rose, the opposite sign of an accuracy BWT's forgetting);
  - ``change_from_before[t]`` = NLL[K-1][t] - before[t] for every column, trained or not
    (for a probe task: how much general ability the whole stream cost).
  """
  continual = continual_summary(before, matrix, stages)
  final = matrix[-1]
  return {
      "forgetting": {t: v["bwt"] for t, v in continual["per_task"].items()},
      "bwt": continual["bwt"],
      "change_from_before": {
          t: None if final[t] is None or before.get(t) is None else final[t] - before[t]
          for t in final
      },
  }
