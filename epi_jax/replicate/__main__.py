"""``python -m epi_jax.replicate``: the replication runner's command line (``replicate.cli``)."""

from epi_jax.replicate.cli import main

raise SystemExit(main())
