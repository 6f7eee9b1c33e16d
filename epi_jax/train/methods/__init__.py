"""The trainer's methods, one module each, and the registry ``method.type`` names them in.

Adding a method: a module with a ``Method`` subclass and one line in ``METHODS``
(docs/methods.md, "Adding a method").
"""

from __future__ import annotations

from epi_jax.train.config import Config
from epi_jax.train.methods.base import Method, Run, Trainable
from epi_jax.train.methods.epi import EPI
from epi_jax.train.methods.ewc import EWC
from epi_jax.train.methods.full import Full
from epi_jax.train.methods.lora import LoRA
from epi_jax.train.methods.static import Static

METHODS: dict[str, type[Method]] = {
    "full": Full,
    "multistage": Method,
    "static": Static,
    "epi": EPI,
    "lora": LoRA,
    "ewc": EWC,
}


def make_method(config: Config) -> Method:
  """The method ``config.method.type`` names, for ``config``."""
  try:
    return METHODS[config.method.type](config)
  except KeyError:
    raise ValueError(
        f"method.type: unknown method {config.method.type!r}, expected one of " f"{sorted(METHODS)}"
    ) from None


__all__ = ["METHODS", "Method", "Run", "Trainable", "make_method"]
