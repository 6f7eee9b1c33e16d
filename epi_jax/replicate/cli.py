"""``python -m epi_jax.replicate --preset cpu|smollm2|paper --seeds N --out DIR [--dry-run]``.

Runs the paper's grid one trainer process per run to a report (``epi_jax.replicate.runner``).
``--preset paper`` prints the GPU commands and dry-runs every config instead of training.
Exit codes: 0 done; 1 a run failed; 2 bad input (one ``error:`` line on stderr) or a config
that does not load.
"""

from __future__ import annotations

import argparse
import os
import time

from epi_jax.errors import input_errors_exit
from epi_jax.replicate import grid, runner
from epi_jax.report import require_plotting

PAPER_NOTE = (
    "# One command per run, each on one 8-GPU host (mesh fsdp=8, docs/trainer.md "
    "'Multi-host'); add --set model.checkpoint=<HF folder of the backbone> (and "
    "data.files.<task>=<file> without hub access). Rerunning a command with --resume "
    "continues it."
)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m epi_jax.replicate", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--preset", required=True, choices=sorted(grid.PRESETS))
  parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
  parser.add_argument("--out", required=True, help="directory of the runs and the report")
  parser.add_argument(
      "--set",
      action="append",
      default=[],
      metavar="KEY=VALUE",
      help="override of every run's config, e.g. data.files.gsm8k=FILE",
  )
  parser.add_argument("--jobs", type=int, default=1, help="trainer processes at once")
  parser.add_argument(
      "--runs",
      metavar="NAME,...",
      help="train only these runs of the grid (the report covers every finished run)",
  )
  parser.add_argument(
      "--docs",
      metavar="FILE",
      help="also write the report's NLL and group tables into FILE's replicate:PRESET block",
  )
  parser.add_argument(
      "--dry-run",
      action="store_true",
      help="print the commands and check every config, train nothing",
  )
  parser.add_argument(
      "--report-only",
      action="store_true",
      help="write the report of the finished runs, train nothing",
  )
  return parser


@input_errors_exit
def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.seeds < 1 or args.jobs < 1:
    parser.error("--seeds and --jobs must be >= 1")
  preset = grid.PRESETS[args.preset]
  jobs = runner.plan(preset, args.seeds, args.out, tuple(args.set))
  if args.dry_run or preset.name == "paper":
    if preset.name == "paper":
      print(PAPER_NOTE)
    for job in [*runner.base_jobs(preset, args.seeds, args.out).values(), *jobs]:
      print(" ".join(job.command()))
    print(f"# {len(jobs)} runs; checking each config:")
    return runner.dry_run(preset, jobs)
  require_plotting()  # the runner ends with the report: refused now, not after the runs
  if args.docs:
    runner.docs_block(args.docs, preset.name)
  os.makedirs(args.out, exist_ok=True)
  chosen = runner.select(jobs, args.runs, preset.name)
  start = time.perf_counter()
  failed = (
      [] if args.report_only else runner.train_grid(preset, args.seeds, chosen, args.out, args.jobs)
  )
  path = runner.write_outputs(preset, jobs, args.out, time.perf_counter() - start)
  print(f"report: {path}")
  if args.docs:
    runner.write_docs(path, preset.name, args.docs)
    print(f"updated: {args.docs}")
  return 1 if failed else 0
