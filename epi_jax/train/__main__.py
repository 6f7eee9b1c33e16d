"""``python -m epi_jax.train``: the trainer's command line (``epi_jax.train.cli``)."""

from epi_jax.train.cli import main

raise SystemExit(main())
