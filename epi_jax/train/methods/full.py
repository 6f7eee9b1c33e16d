"""The full-mixture reference: every task in one stage, trained together with AdamW."""

from __future__ import annotations

from epi_jax.train.methods.base import Method


class Full(Method):
  """One stage holding all of ``data.tasks`` (``method.grouping`` does not apply)."""

  def stages(self) -> list[list[str]]:
    return [list(self.config.data.tasks)]
