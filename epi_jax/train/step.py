"""The jitted training step: response-token cross-entropy, gradient accumulation by a scan over
micro-batches, one optimizer update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import epi_jax
from epi_jax.models.loss import target_log_probs

BATCH_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")


def response_loss(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy over response tokens and their count; logits[:, t] predict
  input_ids[:, t + 1], weighted by loss_mask[:, t + 1]. Packed rows attend within their
  segments only (a padded row is one segment). The logits come in chunks
  (``models.loss.target_log_probs``): the whole [B, T, V] array never exists."""
  hidden = model.hidden_states(
      batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"]
  )
  log_probs = target_log_probs(model, hidden[:, :-1], batch["input_ids"][:, 1:])
  weight = batch["loss_mask"][:, 1:].astype(jnp.float32)
  return -jnp.sum(log_probs * weight), jnp.sum(weight)


def micro_batches(batch: dict[str, jax.Array], num_micro: int) -> dict[str, jax.Array]:
  """The batch [B, T] dealt into ``num_micro`` micro-batches [num_micro, B / num_micro, T]: row j
  goes to micro-batch j % num_micro, so each stays spread over the batch shards."""
  return {
      k: batch[k].reshape(-1, num_micro, *batch[k].shape[1:]).swapaxes(0, 1) for k in BATCH_KEYS
  }


def mean_loss_and_grads(
    model: nnx.Module,
    batch: dict[str, jax.Array],
    num_micro: int,
    *,
    wrt: nnx.filterlib.Filter = nnx.Param,
):
  """(gradients, mean loss, token count) of the response-token loss of ``batch`` w.r.t. the
  model's variables selected by ``wrt``, computed by a scan over ``num_micro`` micro-batches.

  The micro-batches' summed float32 gradients are divided by the batch's response-token count
  (at least 1), so they equal those of one pass over the batch; they stay float32 whatever the
  parameters' dtype (``make_optimizer`` keeps bfloat16 parameters' optimizer state in float32).
  """
  model_def, params, rest = nnx.split(model, wrt, ...)

  def summed(params, micro):
    return response_loss(nnx.merge(model_def, params, rest), micro)

  grad_fn = jax.value_and_grad(summed, has_aux=True)

  def accumulate(carry, micro):
    grads, total, count = carry
    (loss_sum, n), g = grad_fn(params, micro)
    grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
    return (grads, total + loss_sum, count + n), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (grads, total, count), _ = jax.lax.scan(
      accumulate, (zeros, jnp.float32(0), jnp.float32(0)), micro_batches(batch, num_micro)
  )
  count = jnp.maximum(count, 1.0)
  return jax.tree.map(lambda g: g / count, grads), total / count, count


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
