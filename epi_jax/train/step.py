"""The jitted training step: the response-token loss's gradients accumulated over micro-batches
(``models.loss.mean_loss_and_grads``), one optimizer update.

``BATCH_KEYS``, ``response_loss``, ``micro_batches`` and ``mean_loss_and_grads`` live in
``epi_jax.models.loss``; they stay importable from here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import epi_jax
from epi_jax.models.loss import BATCH_KEYS, mean_loss_and_grads, micro_batches, response_loss

__all__ = [
    "BATCH_KEYS",
    "apply_gradients",
    "make_optimizer",
    "make_train_step",
    "mean_loss_and_grads",
    "micro_batches",
    "response_loss",
]


def make_optimizer(
    model: nnx.Module, tx: optax.GradientTransformation, *, wrt: nnx.filterlib.Filter = nnx.Param
) -> nnx.Optimizer:
  """``nnx.Optimizer(model, tx, wrt=wrt)``; where any of those parameters is stored in bfloat16,
  ``tx`` runs in float32 (``epi_jax.float32_state``) and ``apply_gradients`` rounds its updates
  into the parameters stochastically."""
  params = jax.tree.leaves(nnx.state(model, wrt))
  if any(p.dtype == jnp.bfloat16 for p in params):
    tx = epi_jax.float32_state(tx)
  return nnx.Optimizer(model, tx, wrt=wrt)


def apply_gradients(model: nnx.Module, optimizer: nnx.Optimizer, grads: nnx.State) -> None:
  """``optimizer.update(model, grads)`` with ``epi_jax.apply_updates`` in place of
  ``optax.apply_updates``: a bfloat16 parameter takes its float32 update by stochastic
  rounding instead of dropping what lies below half an ulp."""
  params = nnx.as_pure(nnx.state(model, optimizer.wrt))
  updates, opt_state = optimizer.tx.update(
      nnx.as_pure(nnx.state(grads, optimizer.wrt)), nnx.as_pure(optimizer.opt_state), params
  )
  nnx.update(model, epi_jax.apply_updates(params, updates, optimizer.step[...]))
  nnx.update(optimizer.opt_state, nnx.state(opt_state))
  optimizer.step[...] += 1


def make_train_step(
    graphdef: nnx.GraphDef,
    num_micro: int,
    *,
    wrt: nnx.filterlib.Filter = nnx.Param,
    logs: Callable[[nnx.Module, nnx.Optimizer], dict] | None = None,
    shardings: Any = None,
) -> Callable:
  """``step(state, batch) -> (state, out)`` on the split (model, optimizer) state.

  One optimizer update of the variables ``wrt`` selects (the optimizer's own ``wrt``) with the
  gradients of ``mean_loss_and_grads``. ``out`` holds ``loss`` and ``tokens``, plus whatever
  ``logs(model, optimizer)`` returns after the update (traced into the step). The state is
  donated. ``shardings`` (the state's placement, ``like_params(state, mesh)``) pins the new state
  to exactly the layout it came in: left to itself, XLA re-shards leaves such as the replicated
  norm scales in the first step, and the second step compiles again for the new layout.
  """

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    grads, loss, count = mean_loss_and_grads(model, batch, num_micro, wrt=wrt)
    apply_gradients(model, optimizer, grads)
    out = {"loss": loss, "tokens": count} | (logs(model, optimizer) if logs else {})
    return nnx.state((model, optimizer)), out

  return jax.jit(step, donate_argnums=0, out_shardings=(shardings, None))
