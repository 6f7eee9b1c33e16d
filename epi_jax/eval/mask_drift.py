"""Mask drift of an EPI run (Appendix E): Jaccard overlap with the first mask over training."""

from __future__ import annotations

from collections.abc import Sequence


def overlap_at_progress(history: Sequence[dict], total_steps: int,
                        fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0)) -> dict[str, float]:
  """Overlap of the mask in force at 25/50/75/100% of training with the first non-empty mask.

  Args:
    history: the refresh records of a run (``step`` and ``overlap_first`` of each), in order.
    total_steps: the run's optimizer steps.
    fractions: training progress points.

  Returns:
    ``"25%"`` -> overlap of the last refresh at or before that point; points before the first
    refresh are left out.
  """
  out = {}
  for fraction in fractions:
    done = [r for r in history if r["step"] <= fraction * total_steps]
    if done:
      out[f"{round(fraction * 100)}%"] = done[-1]["overlap_first"]
  return out
