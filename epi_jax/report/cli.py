"""``python -m epi_jax.report RUN_DIR [RUN_DIR ...] --out DIR [--title TEXT] [--reference GROUP]``.

Exit codes: 0 written; 2 bad input (one ``error:`` line on stderr)."""

from __future__ import annotations

import argparse

from epi_jax.errors import input_errors_exit
from epi_jax.report.document import write_report


@input_errors_exit
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m epi_jax.report",
      description="Write report.md, report.json and PNG plots of finished runs; runs that "
      "differ only by seed are grouped (mean ± std).",
  )
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run directory")
  parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
  parser.add_argument("--title", default="EPI runs", help="the report's heading")
  parser.add_argument(
      "--reference",
      metavar="GROUP",
      help="the group the held-out NLL comparisons subtract others from (default: first epi)",
  )
  args = parser.parse_args(argv)
  print(write_report(args.run_dirs, args.out, title=args.title, reference=args.reference))
  return 0
