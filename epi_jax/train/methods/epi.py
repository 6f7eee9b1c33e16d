"""EPI (Algorithm 1): AdamW under a protection mask that the EMA sensitivity refreshes every H
steps; the step reports each refresh and its statistics."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import epi_jax
from epi_jax.train.methods.base import Method, Run, Trainable
from epi_jax.train.methods.static import protected_fraction
from epi_jax.train.optimizer import inner_optimizer


class EPI(Method):
  """``epi_jax.epi`` around the run's AdamW, with the ``method`` section's options."""

  analyses = Method.analyses + ("flip_rate", "perturbation")

  def problems(self) -> list[str]:
    m = self.config.method
    if m.sensitivity == "adam_nu" and m.sensitivity_dtype != "float32":
      return ["method.sensitivity_dtype: only applies to sensitivity=grad_sq"]
    return []

  def trainable(self, model: nnx.Module, run: Run) -> Trainable:
    m = self.config.method
    tx = epi_jax.epi(
        inner_optimizer(self.config, run.total_steps),
        p=m.p,
        beta=m.beta,
        interval=m.interval,
        normalize=m.normalize,
        budget=m.budget,
        layer_of=m.layer_of,
        sensitivity=m.sensitivity,
        sensitivity_dtype=jnp.dtype(m.sensitivity_dtype),
    )
    return Trainable(model, tx)

  def step_logs(self, module: nnx.Module, optimizer: nnx.Optimizer) -> dict:
    return {
        "refreshed": epi_jax.refreshed(optimizer.opt_state),
        "refresh": epi_jax.mask_stats(optimizer.opt_state),
    }

  def summary(self, module: nnx.Module, optimizer: nnx.Optimizer) -> dict:
    return {"protected_fraction": protected_fraction(optimizer.opt_state)}
