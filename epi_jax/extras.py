"""Optional dependencies (the package's extras): imported where a feature needs them, and
refused in one line naming the extra when absent (``python -m`` entry points: exit 2)."""

from __future__ import annotations

import importlib
from types import ModuleType

from epi_jax.errors import InputError


class MissingExtra(InputError):
  """A feature needs an optional dependency that is not installed."""


def require(module: str, extra: str, feature: str) -> ModuleType:
  """``module`` imported, or ``MissingExtra``: "<feature> needs the <extra> extra (...):
  pip install 'epi-jax[<extra>]'"."""
  try:
    return importlib.import_module(module)
  except ImportError as error:
    raise MissingExtra(
        f"{feature} needs the {extra} extra (no module {error.name or module}): "
        f"pip install 'epi-jax[{extra}]'"
    ) from None
