"""``python -m epi_jax.report``: the report's command line (``epi_jax.report.cli``)."""

from epi_jax.report.cli import main

raise SystemExit(main())
