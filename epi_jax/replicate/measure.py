"""The numbers the paper's claims compare, read from one run's summary.json."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np


def _get(tree: Mapping, *keys):
  """tree[k0][k1]... or None where a key is missing or a value is None."""
  for key in keys:
    if not isinstance(tree, Mapping) or tree.get(key) is None:
      return None
    tree = tree[key]
  return tree


def _block_flip(per_group: Mapping[str, float | None] | None, pick) -> float | None:
  """The flip rate of the lowest (pick=min) or highest (pick=max) transformer block."""
  blocks = {int(m.group(1)): v for name, v in (per_group or {}).items()
            if (m := re.search(r"(\d+)$", name)) and v is not None and "embed" not in name}
  return blocks[pick(blocks)] if blocks else None


def run_metrics(summary: Mapping, tasks: list[str]) -> dict[str, float | None]:
  """Every metric of ``epi_jax.replicate.paper.METRICS`` for one run (None: not measured).

  `tasks` are the run's tasks in stream order: the last one is Table 14's late task.
  """
  stages = summary["stages"]
  last_stage = set(stages[-1])
  ratios = [v for task, v in summary["forgetting_ratio"].items()
            if v is not None and task not in last_stage]
  analyses = summary.get("analyses", {})
  per_group = _get(analyses, "flip_rate", "per_group")
  out = {
      "avg_norm_score": _get(summary, "avg_norm_score", "avg_norm_score"),
      # Tasks of the last stage have nothing after them to forget.
      "forgetting": float(np.mean(ratios)) if ratios and len(stages) > 1 else None,
      "tgc": _get(analyses, "gradient_conflict", "final", "average"),
      "last_task": _get(summary, "avg_norm_score", "normalized", tasks[-1]),
      "overlap_25": _get(summary, "mask_overlap_first", "25%"),
      "overlap_100": _get(summary, "mask_overlap_first", "100%"),
      "flip_lowest": _block_flip(per_group, min),
      "flip_highest": _block_flip(per_group, max),
      "task_jaccard": _get(analyses, "task_overlap", "final", "average"),
  }
  for point in ("early", "middle", "late"):
    out[f"spearman_{point}"] = _get(analyses, "perturbation", point, "spearman")
  return {k: None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
          for k, v in out.items()}


def mean_std(values: list[float | None]) -> tuple[float, float] | None:
  """(mean, sample std over seeds; 0 for one seed) of the measured values, None if none."""
  xs = [v for v in values if v is not None]
  if not xs:
    return None
  return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
