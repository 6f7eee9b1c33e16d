"""The paper's numbers beside ours, claim by claim, as markdown for the report."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from epi_jax.replicate.paper import METRICS, Claim, verdict

PerSeed = Mapping[int, float]  # seed -> our value (the seeds that measured it)


def _side(side, values: Mapping[str, Mapping[str, PerSeed]], seeds) -> tuple[str, dict]:
  """A claim side's label and our per-seed values (a constant: the same at every seed)."""
  if isinstance(side, float):
    return f"{side:g}", {s: side for s in seeds}
  run, metric = side
  return f"{run} ({METRICS[metric]})", dict(values.get(run, {}).get(metric, {}))


def _fmt(per_seed: Mapping[int, float]) -> str:
  if not per_seed:
    return "n/a"
  v = np.array(list(per_seed.values()))
  return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def _paper(x: float | None) -> str:
  return "—" if x is None else f"{x:g}"


def comparison(
    claims: list[Claim], values: Mapping[str, Mapping[str, PerSeed]]
) -> tuple[str, dict[str, int]]:
  """Markdown tables, one per paper table, and the count of each verdict.

  Args:
    claims: the paper's claims (``epi_jax.replicate.paper.claims``).
    values: run name -> metric -> seed -> our value.
  """
  lines = [
      "## The paper beside ours",
      "",
      "Each row is one direction the paper reports (LLaMA-3-8B numbers), with our mean ± std "
      "over seeds and the paired difference (higher side − lower side, seed by seed) with its "
      "95% bootstrap interval over seeds; the interval alone gives the verdict (above 0: "
      "agrees, below: disagrees, across: cannot tell); a single seed gives the direction only.",
      "",
  ]
  counts: dict[str, int] = {}
  table = None
  every_seed = {s for metrics in values.values() for v in metrics.values() for s in v}
  for claim in claims:
    if claim.table != table:
      table = claim.table
      lines += [
          "",
          f"### {table}",
          "",
          "| paper says | paper | ours (higher side) | ours (lower side) | difference "
          "[95% interval] | seeds | verdict |",
          "| --- | --- | --- | --- | --- | --- | --- |",
      ]
    other = [s for s in (claim.high, claim.low) if not isinstance(s, float)]
    seeds = set(_side(other[0], values, ())[1]) if other else every_seed
    (high, ours_high), (low, ours_low) = (_side(s, values, seeds) for s in (claim.high, claim.low))
    v, d = verdict(ours_high, ours_low)
    counts[v] = counts.get(v, 0) + 1
    interval = "n/a" if d is None else f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
    lines.append(
        f"| {high} > {low} | {_paper(claim.paper[0])} > {_paper(claim.paper[1])} | "
        f"{_fmt(ours_high)} | {_fmt(ours_low)} | {interval} | {0 if d is None else d.seeds} "
        f"| {v} |"
    )
  lines += ["", "Verdicts: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())), ""]
  return "\n".join(lines), counts
