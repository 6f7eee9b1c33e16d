"""The accuracy matrix of a staged run and its forgetting ratios (Appendix B)."""

from __future__ import annotations

from collections.abc import Sequence


def forgetting_ratios(
    matrix: Sequence[dict[str, float]], stages: Sequence[Sequence[str]]
) -> dict[str, float | None]:
  """FR_i = (Perf_initial - Perf_final) / Perf_initial * 100 for every trained task.

  Args:
    matrix: per stage, the headline score of every task measured right after that stage
      (None: not measured, e.g. a judge that never replied).
    stages: the tasks trained in each stage; Perf_initial of a task is its accuracy after
      the stage that trained it, Perf_final its accuracy after the last stage.

  Returns:
    task -> FR in percent; None when Perf_initial is 0 or either score is missing.
  """
  final = matrix[-1]
  out: dict[str, float | None] = {}
  for k, stage in enumerate(stages[: len(matrix)]):
    for task in stage:
      initial = matrix[k][task]
      defined = initial is not None and final[task] is not None and initial > 0
      out[task] = (initial - final[task]) / initial * 100 if defined else None
  return out


def format_table(
    matrix: Sequence[dict[str, float]],
    stages: Sequence[Sequence[str]],
    ratios: dict[str, float | None],
) -> str:
  """The accuracy matrix (rows: after each stage; columns: tasks) and the forgetting ratios."""
  tasks = list(matrix[0])
  width = max(12, *(len(t) + 2 for t in tasks))
  lines = ["after stage (trained)".ljust(34) + "".join(t.rjust(width) for t in tasks)]
  for k, row in enumerate(matrix):
    label = f"{k} ({', '.join(stages[k])})"[:33]
    lines.append(
        label.ljust(34)
        + "".join(("n/a" if row[t] is None else f"{row[t]:.3f}").rjust(width) for t in tasks)
    )
  lines.append(
      "forgetting ratio FR %".ljust(34)
      + "".join(
          ("n/a" if ratios.get(t) is None else f"{ratios[t]:.1f}").rjust(width) for t in tasks
      )
  )
  return "\n".join(lines)
