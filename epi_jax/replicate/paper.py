"""What the paper reports, as directions our runs can agree or disagree with.

Each claim compares two measured quantities (a run of the grid and a metric) or one quantity
and a constant. The paper's numbers are LLaMA-3-8B's (its ablations are on that backbone):
Avg. Norm. Score (Tables 1-5, 10), average forgetting ratio FR % (Table 6), average task
gradient conflict TGC (Table 7), the last task's score (UltraChat, Table 14), mask overlap
with the first mask (Table 11), flip rates of the lowest and highest layer groups (Table 12),
mean task-pair Jaccard of the top-p sets (Table 13), and the importance / perturbation rank
correlation (Table 15).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from epi_jax.eval.paired import PairedDifference, paired_difference

METRICS = {
    "avg_norm_score": "Avg. Norm. Score",
    "forgetting": "avg FR %",
    "tgc": "avg TGC",
    "last_task": "last task's score (0-10)",
    "overlap_25": "overlap with first mask at 25%",
    "overlap_100": "overlap with first mask at 100%",
    "flip_lowest": "flip rate of the lowest block",
    "flip_highest": "flip rate of the highest block",
    "task_jaccard": "mean task-pair Jaccard",
    "spearman_early": "Spearman rho, early",
    "spearman_middle": "Spearman rho, middle",
    "spearman_late": "Spearman rho, late",
}
"""The metrics the claims use (``epi_jax.replicate.measure`` reads them from each run)."""

Side = tuple[str, str] | float  # (run name, metric) or a constant


@dataclasses.dataclass(frozen=True)
class Claim:
  """The paper says ``high`` > ``low`` (values ``paper``, None where it gives no number)."""

  table: str
  high: Side
  low: Side
  paper: tuple[float | None, float | None]


def _scores(
    table: str,
    pairs: list[tuple[str, str]],
    paper: dict[str, float | None],
    metric: str = "avg_norm_score",
    lower_is_better: bool = False,
) -> list[Claim]:
  """Claims ``a`` better than ``b`` for each pair; lower_is_better flips the inequality."""
  out = []
  for a, b in pairs:
    hi, lo = (b, a) if lower_is_better else (a, b)
    out.append(Claim(table, (hi, metric), (lo, metric), (paper[hi], paper[lo])))
  return out


_T1 = {
    "full": 7.32,
    "multistage_random": 7.44,
    "multistage_heuristic": 7.48,
    "static": 7.68,
    "epi": 7.98,
}
_T6 = {"multistage_random": 7.94, "multistage_heuristic": 7.42, "static": 5.14, "epi": 4.66}
_T7 = {
    "full": 0.358,
    "multistage_random": 0.262,
    "multistage_heuristic": 0.234,
    "static": 0.138,
    "epi": 0.108,
}
_T2 = {"static": 7.68, "static_layer_norm": 7.82, "epi_global_raw": 7.83, "epi": 7.98}
_T3 = {"epi_per_layer": 7.82, "epi_global_raw": 7.71, "epi": 7.98}
_T4 = {"epi_beta0": 7.81, "epi_beta0.9": 7.90, "epi": 7.98}
_T10 = {"static_p0.005": 7.59, "static": 7.68, "static_p0.02": 7.42, "static_p0.05": 7.12}
_T14 = {
    "static_p0.005": 8.2,
    "static": 8.3,
    "static_p0.02": 7.9,
    "static_p0.05": 7.6,
    "epi_p0.005": 8.4,
    "epi": 8.6,
    "epi_p0.02": 8.4,
    "epi_p0.05": 8.2,
}
PAPER_H = (100, 500, 1000, 2000)
_T5 = (7.92, 7.98, 7.95, 7.89)
PAPER_P = (0.005, 0.01, 0.02, 0.05)


def claims(h_sweep: tuple[int, ...], interval: int) -> list[Claim]:
  """Every claim; Table 5's H values are the preset's sweep, matched to the paper's by rank."""
  methods = ["epi", "static", "multistage_heuristic", "multistage_random", "full"]
  out = _scores("Table 1", [(a, b) for i, a in enumerate(methods) for b in methods[i + 1 :]], _T1)
  # One stage has nothing to forget: FR of the full mixture is 0 by definition here.
  out += _scores(
      "Table 6",
      [(a, b) for i, a in enumerate(methods[:4]) for b in methods[i + 1 : 4]],
      _T6,
      "forgetting",
      lower_is_better=True,
  )
  out += _scores(
      "Table 7",
      [(a, b) for i, a in enumerate(methods) for b in methods[i + 1 :]],
      _T7,
      "tgc",
      lower_is_better=True,
  )
  out += _scores(
      "Table 2",
      [
          ("static_layer_norm", "static"),
          ("epi_global_raw", "static"),
          ("epi", "static_layer_norm"),
          ("epi", "epi_global_raw"),
      ],
      _T2,
  )
  out += _scores("Table 3", [("epi", "epi_per_layer"), ("epi", "epi_global_raw")], _T3)
  out += _scores(
      "Table 4", [("epi", "epi_beta0.9"), ("epi_beta0.9", "epi_beta0"), ("epi", "epi_beta0")], _T4
  )
  names = {h: "epi" if h == interval else f"epi_H{h}" for h in h_sweep}
  if len(h_sweep) == len(PAPER_H):
    paper = {names[h]: v for h, v in zip(sorted(h_sweep), _T5)}
    out += _scores("Table 5", [("epi", n) for n in paper if n != "epi"], paper)
  out += _scores(
      "Fig. 6",
      [("epi", f"epi_p{p:g}") for p in PAPER_P if p != 0.01],
      {"epi": 7.98} | {f"epi_p{p:g}": None for p in PAPER_P},
  )
  out += _scores(
      "Table 10",
      [("static", "static_p0.005"), ("static", "static_p0.02"), ("static_p0.02", "static_p0.05")],
      _T10,
  )
  out += _scores(
      "Table 14",
      [
          (f"epi_p{p:g}" if p != 0.01 else "epi", f"static_p{p:g}" if p != 0.01 else "static")
          for p in PAPER_P
      ],
      _T14,
      "last_task",
  )
  out += [
      Claim("Table 11", ("epi", "overlap_25"), ("epi", "overlap_100"), (78.3, 44.7)),
      Claim("Table 12", ("epi", "flip_highest"), ("epi", "flip_lowest"), (41.2, 12.3)),
      Claim("Table 13", 0.5, ("epi", "task_jaccard"), (0.5, (0.31 + 0.42 + 0.28) / 3)),
  ]
  out += [
      Claim("Table 15", ("epi", f"spearman_{point}"), 0.0, (rho, 0.0))
      for point, rho in (("early", 0.68), ("middle", 0.71), ("late", 0.69))
  ]
  return out


def verdict(
    high: Mapping[int, float], low: Mapping[int, float]
) -> tuple[str, PairedDifference | None]:
  """Whether our per-seed values (seed -> value) agree with "high > low", and the paired
  difference high - low it rests on.

  The seeds both sides measured are paired; the difference's 95% bootstrap interval over those
  seeds (``epi_jax.eval.paired``; each run is one number here, so the seeds are the only level
  resampled) decides alone: "agrees" above 0, "disagrees" below, "cannot tell" across 0. One
  seed gives a direction only ("same direction, 1 seed", "opposite direction, 1 seed",
  "equal, 1 seed"); no common seed: "not measured".
  """
  seeds = sorted(set(high) & set(low))
  if not seeds:
    return "not measured", None
  difference = paired_difference([[high[s]] for s in seeds], [[low[s]] for s in seeds])
  if len(seeds) < 2:
    d = difference.mean
    return ("equal" if d == 0 else "same direction" if d > 0 else "opposite direction") + (
        ", 1 seed"
    ), difference
  words = {"more": "agrees", "less": "disagrees", "cannot tell": "cannot tell"}
  return words[difference.verdict], difference
