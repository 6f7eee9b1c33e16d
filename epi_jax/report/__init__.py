"""Reports of finished runs: ``python -m epi_jax.report RUN_DIR [RUN_DIR ...] --out DIR``.

``load_run`` reads a run directory into a ``FinishedRun`` (``Run``, its former name, still
works), ``group_runs`` puts runs that differ only by seed together,
``run_metrics``/``aggregate`` give the numbers of a run / a group as plain dicts, and
``write_report`` writes report.md, report.json and the PNG plots (docs/trainer.md, "Report";
the plots need the ``report`` extra, matplotlib).
"""

from epi_jax.report.document import require_plotting, write_report
from epi_jax.report.runs import (
    LEARNED,
    FinishedRun,
    RunError,
    aggregate,
    group_runs,
    load_run,
    run_metrics,
    stats,
)

Run = FinishedRun
"""Deprecated: the former name of ``FinishedRun``."""

__all__ = [
    "LEARNED",
    "FinishedRun",
    "Run",
    "RunError",
    "aggregate",
    "group_runs",
    "load_run",
    "require_plotting",
    "run_metrics",
    "stats",
    "write_report",
]
