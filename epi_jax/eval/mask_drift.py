"""Mask drift of an EPI run (Appendix E.2): Jaccard overlap with the first mask over training
(Table 11) and per-layer-group flip rates between consecutive refreshes (Table 12)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def overlap_at_progress(
    history: Sequence[dict], total_steps: int, fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0)
) -> dict[str, float]:
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


def refresh_flip_rates(record: dict) -> list[float]:
  """Per group flip rate of one refresh against the mask before it (Table 12).

  flip_l = (locked_l + freed_l) / (protected_l + freed_l): the entries of group l whose bit
  changed over those protected before or after (the union of the two masks), i.e. one minus
  the group's Jaccard overlap of the two masks; 0 for a group with nothing protected in either.

  Args:
    record: a refresh record with per-group ``locked``, ``freed``, ``protected`` counts
      (``epi_jax.mask_stats``).
  """
  return [
      (lock + free) / (prot + free) if prot + free else 0.0
      for lock, free, prot in zip(record["locked"], record["freed"], record["protected"])
  ]


def flip_rates(history: Sequence[dict], group_names: Sequence[str]) -> dict:
  """Average flip rate of each layer group over consecutive refreshes (Table 12).

  The first refresh is compared with the empty initial mask, not with a refresh, so it is left
  out. A group's average pools its refreshes: sum of (locked + freed) over sum of
  (protected + freed), so refreshes with more protected entries weigh more.

  Returns:
    ``per_group``: group name -> average flip rate (None if the group never held a protected
    entry); ``all``: the same pooled over every group; ``refreshes``: how many refreshes count.
  """
  pairs = history[1:]
  flips = np.zeros(len(group_names))
  union = np.zeros(len(group_names))
  for record in pairs:
    flips += np.add(record["locked"], record["freed"])
    union += np.add(record["protected"], record["freed"])
  return {
      "per_group": {
          name: float(f / u) if u else None for name, f, u in zip(group_names, flips, union)
      },
      "all": float(flips.sum() / union.sum()) if union.sum() else None,
      "refreshes": len(pairs),
  }
