"""Continual-learning summary of a staged run's accuracy matrix: ACC, BWT, FWT, max-forgetting.

The matrix has one row per finished stage (R[k][task]: the task's score right after stage k)
and a row ``before`` measured before the first stage (b[task]). A task belongs to the stage that
trains it, s(task); with one task per stage these are the formulas of the references below,
with several tasks per stage each task of a stage counts on its own. A score that could not be
measured (None) leaves its task out of every mean that would need it.

References:
  Lopez-Paz and Ranzato, Gradient Episodic Memory for Continual Learning, NeurIPS 2017
  (ACC, BWT, FWT), https://arxiv.org/abs/1706.08840.
  Chaudhry et al., Riemannian Walk for Incremental Learning, ECCV 2018 (forgetting measure),
  https://arxiv.org/abs/1801.10112.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from epi_jax.eval.forgetting import forgetting_ratios

Row = Mapping[str, float | None]


def _mean(values) -> float | None:
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else None


def _diff(a: float | None, b: float | None) -> float | None:
  return None if a is None or b is None else a - b


def continual_summary(
    before: Row | None, matrix: Sequence[Row], stages: Sequence[Sequence[str]]
) -> dict:
  """ACC, BWT, FWT, max-forgetting and mean FR of the tasks of the finished stages.

  With K = len(matrix) finished stages and s(t) the stage of task t:

  - ``acc`` = mean_t R[K-1][t] over every trained task (GEM's ACC).
  - ``bwt`` = mean over t with s(t) < K-1 of R[K-1][t] - R[s(t)][t] (GEM's BWT).
  - ``fwt`` = mean over t with s(t) >= 1 of R[s(t)-1][t] - b[t] (GEM's FWT, b = ``before``).
  - ``max_forgetting`` = mean over t with s(t) < K-1 of
    max_{s(t) <= l <= K-2} R[l][t] - R[K-1][t] (Chaudhry et al.'s f_j^k at k = K-1; the rows
    before s(t) are left out: the task was not learned yet, and in their single-head setting
    those accuracies are 0).
  - ``forgetting_ratio_mean``: the mean of Eq. 14's FR over the tasks with s(t) < K-1.

  Args:
    before: task -> score before any training; None: no FWT.
    matrix: per finished stage, task -> score after it.
    stages: the tasks of each stage, in training order.

  Returns:
    The five means (None when no task qualifies) and ``per_task``: task -> its own
    ``bwt``/``fwt``/``max_forgetting``/``forgetting_ratio`` (None where undefined; FR also
    where the task's score after its own stage is 0).
  """
  if not matrix:
    raise ValueError("continual_summary needs at least one finished stage in the matrix")
  last = len(matrix) - 1
  final = matrix[last]
  trained = [(s, t) for s, stage in enumerate(stages[: len(matrix)]) for t in stage]
  per_task: dict[str, dict] = {}
  for s, t in trained:
    earlier = [matrix[j][t] for j in range(s, last)]
    initial = matrix[s][t]
    per_task[t] = {
        "bwt": _diff(final[t], matrix[s][t]) if s < last else None,
        "fwt": _diff(matrix[s - 1][t], before[t]) if before is not None and s >= 1 else None,
        "max_forgetting": (
            max(earlier) - final[t]
            if earlier and None not in earlier and final[t] is not None
            else None
        ),
        # Eq. 14, as epi_jax.eval.forgetting computes it, for the tasks that saw later stages.
        "forgetting_ratio": (
            (initial - final[t]) / initial * 100
            if s < last and initial and final[t] is not None
            else None
        ),
    }
  return {
      "acc": _mean(final[t] for _, t in trained),
      "bwt": _mean(per_task[t]["bwt"] for _, t in trained),
      "fwt": _mean(per_task[t]["fwt"] for _, t in trained),
      "max_forgetting": _mean(per_task[t]["max_forgetting"] for _, t in trained),
      "forgetting_ratio_mean": _mean(per_task[t]["forgetting_ratio"] for _, t in trained),
      "per_task": per_task,
  }


def probe_forgetting(before: Row | None, after: Row | None) -> dict:
  """What a stream cost the probe tasks (skills no stage trains): each one's score
  ``before`` training and ``after`` the last stage, its forgetting ratio (Eq. 14 with the
  score before training as Perf_initial; None where that is 0 or a score is missing) and
  their mean (None when no ratio is defined)."""
  ratios = forgetting_ratios([before, after], [list(before)]) if before and after else {}
  return {
      "before": before,
      "after": after,
      "forgetting_ratio": ratios,
      "forgetting_ratio_mean": _mean(ratios.values()),
  }
