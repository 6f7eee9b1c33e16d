"""Deprecated alias of EWC's former module: the penalty from ``epi_jax._src.ewc``, the Fisher and
the memory estimate from ``epi_jax.train.methods.ewc``."""

from epi_jax._src.ewc import EWCState, consolidate, init, penalty, penalty_gradient
from epi_jax.train.methods.ewc import EWCMemory, example_losses, fisher_diagonal, memory_bytes

__all__ = [
    "EWCMemory",
    "EWCState",
    "consolidate",
    "example_losses",
    "fisher_diagonal",
    "init",
    "memory_bytes",
    "penalty",
    "penalty_gradient",
]
