"""The numbers the paper's claims compare, for one finished run (``epi_jax.report.FinishedRun``)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from epi_jax.report import FinishedRun, run_metrics


def _get(tree: Mapping, *keys):
  """tree[k0][k1]... or None where a key is missing or a value is None."""
  for key in keys:
    if not isinstance(tree, Mapping) or tree.get(key) is None:
      return None
    tree = tree[key]
  return tree


def _block_flip(per_group: Mapping[str, float | None] | None, pick) -> float | None:
  """The flip rate of the lowest (pick=min) or highest (pick=max) transformer block."""
  blocks = {
      int(m.group(1)): v
      for name, v in (per_group or {}).items()
      if (m := re.fullmatch(r"block/(\d+)", name)) and v is not None
  }
  return blocks[pick(blocks)] if blocks else None


def claim_metrics(run: FinishedRun) -> dict[str, float | None]:
  """Every metric of ``epi_jax.replicate.paper.METRICS`` for ``run`` (None: not measured)."""
  s, analyses = run.summary, run.summary.get("analyses", {})
  common = run_metrics(run)
  per_group = _get(analyses, "flip_rate", "per_group")
  out = {
      "avg_norm_score": common["avg_norm_score"],
      # One stage has nothing after it to forget: FR of the full mixture is undefined.
      "forgetting": common["forgetting_ratio_mean"] if len(s["stages"]) > 1 else None,
      "tgc": _get(analyses, "gradient_conflict", "final", "average"),
      "last_task": _get(s, "avg_norm_score", "normalized", run.config["data"]["tasks"][-1]),
      "overlap_25": _get(s, "mask_overlap_first", "25%"),
      "overlap_100": _get(s, "mask_overlap_first", "100%"),
      "flip_lowest": _block_flip(per_group, min),
      "flip_highest": _block_flip(per_group, max),
      "task_jaccard": _get(analyses, "task_overlap", "final", "average"),
  }
  for point in ("early", "middle", "late"):
    out[f"spearman_{point}"] = _get(analyses, "perturbation", point, "spearman")
  return {k: None if v is None or math.isnan(v) else float(v) for k, v in out.items()}
