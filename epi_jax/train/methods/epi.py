"""EPI (Algorithm 1): AdamW under a protection mask that the EMA sensitivity refreshes every H
steps; the step reports each refresh and its statistics, which the run records."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import epi_jax
from epi_jax._src.state import packed_mask
from epi_jax.train.distributed import host_array
from epi_jax.train.methods.base import GIB, Masked, Method, Run, Trainable, tree_bytes
from epi_jax.train.optimizer import float32_params, inner_optimizer

SENSITIVITY_OPTIONS = (("grad_sq", "float32"), ("grad_sq", "bfloat16"), ("adam_nu", "float32"))
"""The sensitivity options the dry run's memory plan prices."""


def host_packed_masks(opt_state) -> dict:
  """The current protection mask by path, packed as the optimizer state holds it, on the host
  (gathered from all processes: every process must call it)."""
  return {
      jax.tree_util.keystr(path): host_array(leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(packed_mask(opt_state))[0]
  }


class EPI(Masked):
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
        inner_optimizer(self.config, run.stage_steps),
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

  def begin_session(self, optimizer: nnx.Optimizer, mask_history: list[dict]) -> None:
    """The protected fraction of the last refresh, else of the state."""
    super().begin_session(optimizer, mask_history)
    if mask_history:
      self.protected = mask_history[-1]["protected_fraction"]

  def refresh(self, out: dict) -> dict | None:
    if not bool(out["refreshed"]):
      return None
    stats = {key: np.asarray(v) for key, v in out["refresh"].items()}
    self.protected = float(stats["protected_fraction"])
    return stats

  def refreshed_masks(self, opt_state) -> dict:
    return host_packed_masks(opt_state)

  def step_record(self, out: dict) -> dict:
    return super().step_record({k: v for k, v in out.items() if k not in ("refreshed", "refresh")})

  def memory_plan(self, model: nnx.Module, plan: dict, fraction: float) -> dict:
    """Per sensitivity option: the sensitivity, the current and first masks, and the total."""
    params32 = float32_params(model)
    per_device = lambda tree: tree_bytes(tree) * fraction / GIB
    rows = {}
    for sensitivity, dtype in SENSITIVITY_OPTIONS:
      tx = epi_jax.epi(
          inner_optimizer(self.config, 1000),
          p=0.01,
          sensitivity=sensitivity,
          sensitivity_dtype=jnp.dtype(dtype),
      )
      state = jax.eval_shape(tx.init, params32)
      sensitivity_gib = per_device(state.sensitivity)
      mask_gib = per_device(state.mask) + per_device(state.first_mask)
      rows[f"{sensitivity}_{dtype}" if sensitivity == "grad_sq" else sensitivity] = {
          "sensitivity_gib": sensitivity_gib,
          "mask_gib": mask_gib,
          "total_gib": plan["total_without_epi_gib"] + sensitivity_gib + mask_gib,
      }
    return rows

  def memory_table(self, rows: dict) -> tuple[str, list[str]]:
    lines = [
        f"  {name:24s} {option['sensitivity_gib']:11.2f} {option['mask_gib']:6.2f} "
        f"{option['total_gib']:7.2f}"
        for name, option in rows.items()
    ]
    return "  EPI sensitivity option   sensitivity   mask   total", lines
