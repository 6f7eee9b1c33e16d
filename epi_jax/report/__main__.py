"""python -m epi_jax.report RUN_DIR [RUN_DIR ...] --out DIR [--title TEXT]"""

from __future__ import annotations

import argparse
import sys

from epi_jax.report.document import write_report
from epi_jax.report.runs import RunError


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m epi_jax.report",
      description="Write report.md, report.json and PNG plots of finished runs; runs that "
      "differ only by seed are grouped (mean ± std).",
  )
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run directory")
  parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
  parser.add_argument("--title", default="EPI runs", help="the report's heading")
  args = parser.parse_args(argv)
  try:
    path = write_report(args.run_dirs, args.out, title=args.title)
  except (RunError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(path)


if __name__ == "__main__":
  main()
