"""``python -m epi_jax.train``: the trainer's command line (``epi_jax.train.cli``)."""

import sys

from epi_jax.train.cli import main

sys.exit(main())
