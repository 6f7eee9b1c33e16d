"""The paper's numbers beside ours, claim by claim, as markdown for the report."""

from __future__ import annotations

from collections.abc import Mapping

from epi_jax.replicate.paper import METRICS, Claim, verdict

Stats = tuple[float, float] | None  # (mean, std over seeds)


def _side(side, values: Mapping[str, Mapping[str, Stats]]) -> tuple[str, Stats]:
  """A claim side's label and our (mean, std)."""
  if isinstance(side, float):
    return f"{side:g}", (side, 0.0)
  run, metric = side
  return f"{run} ({METRICS[metric]})", values.get(run, {}).get(metric)


def _fmt(stats: Stats) -> str:
  return "n/a" if stats is None else f"{stats[0]:.3f} ± {stats[1]:.3f}"


def _paper(x: float | None) -> str:
  return "—" if x is None else f"{x:g}"


def comparison(
    claims: list[Claim], values: Mapping[str, Mapping[str, Stats]], seeds: Mapping[str, int]
) -> tuple[str, dict[str, int]]:
  """Markdown tables, one per paper table, and the count of each verdict.

  Args:
    claims: the paper's claims (``epi_jax.replicate.paper.claims``).
    values: run name -> metric -> our (mean, std over seeds).
    seeds: run name -> number of finished seeds.
  """
  lines = [
      "## The paper beside ours",
      "",
      "Each row is one direction the paper reports (LLaMA-3-8B numbers), with our mean ± std "
      "over seeds; a direction agrees or disagrees when the difference of the means exceeds "
      "the larger std, else it is within noise; a single seed gives the direction only.",
      "",
  ]
  counts: dict[str, int] = {}
  table = None
  for claim in claims:
    if claim.table != table:
      table = claim.table
      lines += [
          "",
          f"### {table}",
          "",
          "| paper says | paper | ours (higher side) | ours (lower side) | seeds | verdict |",
          "| --- | --- | --- | --- | --- | --- |",
      ]
    (high, ours_high), (low, ours_low) = _side(claim.high, values), _side(claim.low, values)
    n = min(seeds.get(s[0], 0) for s in (claim.high, claim.low) if not isinstance(s, float))
    v = verdict(ours_high, ours_low, n)
    counts[v] = counts.get(v, 0) + 1
    lines.append(
        f"| {high} > {low} | {_paper(claim.paper[0])} > {_paper(claim.paper[1])} | "
        f"{_fmt(ours_high)} | {_fmt(ours_low)} | {n} | {v} |"
    )
  lines += ["", "Verdicts: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())), ""]
  return "\n".join(lines), counts
