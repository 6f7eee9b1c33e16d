"""``python -m epi_jax.demo [--out DIR] [--jobs J] [--set KEY=VALUE ...]``: sequential SFT, EPI
and static isolation side by side on the ``cpu`` preset's stream, from its pretrained base, with
a verdict that states the interval it rests on, and a report.

The demo is the replication runner's ``demo`` preset: the ``cpu`` grid's ``sequential``,
``epi`` and ``static`` runs at seed 0 (the same training, bit for bit), after that seed's base
model (trained once, kept under ``DIR/base``).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping

from epi_jax.errors import input_errors_exit

PRESET = "demo"
LABELS = {"sequential": "sequential SFT", "epi": "EPI", "static": "static isolation"}


def _pct(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.1f}%"


def verdict(row: Mapping, scores: Mapping[str, Mapping[str, float | None]]) -> str:
  """One line: EPI minus sequential SFT in held-out NLL forgetting, its 95% interval and what
  the interval says (``epi_jax.report.nll_study.reading``), then the forgetting ratios."""
  from epi_jax.report.nll_study import reading

  epi, seq = scores["epi"], scores["sequential"]
  return (
      f"{reading({**row, 'reference': 'EPI'})}: held-out NLL forgetting, EPI minus sequential "
      f"SFT, {row['mean']:+.4f} nats/token, 95% interval [{row['low']:+.4f}, {row['high']:+.4f}] "
      f"over {row['examples']} examples and {row['seeds']} seed(s); stream FR "
      f"{_pct(epi['forgetting_ratio_mean'])} vs {_pct(seq['forgetting_ratio_mean'])}, base-skill "
      f"FR {_pct(epi['base_forgetting_ratio_mean'])} vs {_pct(seq['base_forgetting_ratio_mean'])}."
  )


def _print_results(runs: Mapping) -> str:
  """Prints each run's accuracy matrix and the methods' scores; returns the verdict line."""
  from epi_jax.eval.forgetting import format_table
  from epi_jax.report import run_metrics
  from epi_jax.report.nll_study import paired_rows

  print()
  scores = {}
  for name, run in runs.items():
    s = run.summary
    print(f"{LABELS[name]}  (wall time {s['wall_time_s']:.0f} s)")
    matrix = [r["accuracy"] for r in s["accuracy_matrix"]]
    print(format_table(matrix, s["stages"], s["forgetting_ratio"]))
    print()
    scores[name] = run_metrics(run)
  print(f"{'method':<18}{'final acc':>10}{'mean FR':>10}{'base-skill FR':>15}")
  for name, sc in scores.items():
    print(
        f"{LABELS[name]:<18}{sc['mean_final_accuracy']:>10.3f}"
        f"{_pct(sc['forgetting_ratio_mean']):>10}{_pct(sc['base_forgetting_ratio_mean']):>15}"
    )
  rows = paired_rows({"epi": [runs["epi"]], "sequential": [runs["sequential"]]}, "epi")
  (row,) = [r for r in rows if r["other"] == "sequential" and r["quantity"] == "forgetting"]
  line = verdict(row, scores)
  print(f"\nverdict: {line}")
  return line


@input_errors_exit
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m epi_jax.demo", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--out", default="runs/demo", help="where the runs and the report go")
  parser.add_argument("--jobs", type=int, default=2, help="trainer processes at once")
  parser.add_argument(
      "--set",
      action="append",
      default=[],
      metavar="KEY=VALUE",
      help="override of every run's config, e.g. train.steps_per_stage=20",
  )
  args = parser.parse_args(argv)
  if args.jobs < 1:
    parser.error("--jobs must be >= 1")

  from epi_jax.replicate import grid, runner
  from epi_jax.report import load_run, require_plotting, write_report

  require_plotting()  # the demo ends with the report's plots
  preset = grid.PRESETS[PRESET]
  jobs = runner.plan(preset, 1, args.out, tuple(args.set))  # every config checked here
  start = time.perf_counter()
  if runner.train_grid(preset, 1, jobs, args.out, args.jobs):
    return 1
  runs = {job.entry.name: load_run(job.run_dir) for job in jobs}
  line = _print_results({name: runs[name] for name in LABELS})
  report = write_report(
      [job.run_dir for job in jobs],
      os.path.join(args.out, "report"),
      labels={job.run_dir: LABELS[job.entry.name] for job in jobs},
      title="EPI demo",
      extra_markdown=f"## Verdict\n\n{line}\n",
  )
  print(f"report: {report}\ndemo wall time {(time.perf_counter() - start) / 60:.1f} min")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
