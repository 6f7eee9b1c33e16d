"""Elastic Weight Consolidation: the diagonal empirical Fisher of a stage, its anchor weights,
and the quadratic penalty that keeps later stages near them.

Kirkpatrick et al. 2017 (arXiv 1612.00796), Eq. 3: training task B after task A minimizes

  L(theta) = L_B(theta) + sum_i lambda / 2 * F_i * (theta_i - theta*_A,i)^2

with F the diagonal Fisher at theta*_A. Here F is the empirical Fisher: the mean over examples
n of the squared per-example gradient g_n = grad_theta l_n(theta*), with l_n the
response-token cross-entropy of ``models.loss.response_loss`` for example n alone (its summed CE
over its response tokens / their count). An example is a batch row (with packed rows, a row's
examples together); rows without response tokens are left out of the mean.

After several stages the penalties add up. Offline (Kirkpatrick's "sum of quadratic penalties
is itself a quadratic penalty"): sum_t F_t (theta - theta*_t)^2 = F (theta - theta*)^2 + C with
F = sum_t F_t, theta* = sum_t F_t theta*_t / F and the scalar C kept, so the state stays one
Fisher and one anchor whatever the number of stages. Online EWC (Schwarz et al. 2018, arXiv
1805.06370): F <- gamma * F + F_new and theta* <- the latest weights.

>>> state = ewc.init(params)
>>> fisher = ewc.fisher_diagonal(model, batches_of_stage_1)
>>> state = ewc.consolidate(state, nnx.state(model, nnx.Param), fisher)   # offline
>>> loss = task_loss + ewc.penalty(params, state, lam=100.0)

or, with the state inside the optimizer, ``optax.chain(ewc.penalty_gradient(100.0), adamw)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from epi_jax.models.loss import BATCH_KEYS, micro_batches, response_loss


class EWCState(NamedTuple):
  """The penalty's quadratic; every field is an array, so it checkpoints like params."""

  fisher: Any  # like params, float32: the (summed or decayed) diagonal Fisher F
  anchor: Any  # like params, float32: theta*
  constant: jax.Array  # shape=(), float32: C of the merged offline penalties (0 online)
  consolidations: jax.Array  # shape=(), int32: stages consolidated so far


def _row_loss(model: nnx.Module, row: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(loss, response-token count) of one row [T]: its summed response CE / count (0 if none)."""
  total, count = response_loss(model, {k: row[k][None] for k in BATCH_KEYS})
  return total / jnp.maximum(count, 1.0), count


def example_losses(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Per-example losses [B] and response-token counts [B] of ``batch`` (``models.loss.BATCH_KEYS``)."""
  return jax.vmap(lambda row: _row_loss(model, row))({k: batch[k] for k in BATCH_KEYS})


@functools.partial(jax.jit, static_argnames=("graphdef", "chunks"))
def _squared_grad_sums(graphdef, params, rest, batch, chunks):
  """(sum over rows with response tokens of g_n^2 in float32, number of such rows); the
  per-example gradients of one chunk of rows at a time are vmapped."""

  def loss(params, row):
    return _row_loss(nnx.merge(graphdef, params, rest), row)

  per_example = jax.vmap(jax.grad(loss, has_aux=True), in_axes=(None, 0))

  def add_chunk(sums, rows):
    grads, counts = per_example(params, rows)
    valid = (counts > 0).astype(jnp.float32)
    sums = jax.tree.map(
        lambda s, g: s + jnp.tensordot(valid, jnp.square(g.astype(jnp.float32)), axes=1),
        sums,
        grads,
    )
    return sums, jnp.sum(valid)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  sums, valid = jax.lax.scan(add_chunk, zeros, micro_batches(batch, chunks))
  return sums, jnp.sum(valid)


def fisher_diagonal(
    model: nnx.Module,
    batches: Iterable[dict[str, jax.Array]],
    *,
    examples_per_chunk: int | None = None,
):
  """The diagonal empirical Fisher of the model's ``nnx.Param`` over ``batches``.

  F = (1 / N) sum_n g_n * g_n over the N examples (rows) with response tokens, g_n the
  gradient of that example's loss alone (see the module docstring), in float32.

  Args:
    model: the Decoder at the end of a stage (theta*).
    batches: dicts with train.step's keys, [B, T] each (e.g. ``ewc.fisher_batches`` batches of
      the stage's iterator); B may differ between batches.
    examples_per_chunk: per-example gradients held at once (vmapped), a divisor of every B;
      None: a whole batch. Memory: this many gradient copies.

  Returns:
    float32 arrays shaped like ``nnx.state(model, nnx.Param)``.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  total, examples = None, jnp.float32(0)
  for i, batch in enumerate(batches):
    rows = batch["input_ids"].shape[0]
    chunk = examples_per_chunk or rows
    if chunk < 1 or rows % chunk:
      raise ValueError(
          f"examples_per_chunk={examples_per_chunk} does not divide the {rows} "
          f"rows of batch {i}"
      )
    sums, valid = _squared_grad_sums(graphdef, params, rest, batch, rows // chunk)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    examples = examples + valid
  if total is None:
    raise ValueError("fisher_diagonal needs at least one batch")
  return jax.tree.map(lambda s: s / jnp.maximum(examples, 1.0), total)


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def init(params: optax.Params) -> EWCState:
  """The state before any consolidation: F = 0, so the penalty is 0."""
  zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  return EWCState(
      fisher=zeros,
      anchor=jax.tree.map(jnp.copy, _f32(params)),
      constant=jnp.zeros((), jnp.float32),
      consolidations=jnp.zeros((), jnp.int32),
  )


def consolidate(
    state: EWCState, params: optax.Params, fisher: optax.Params, *, gamma: float | None = None
) -> EWCState:
  """Adds a finished stage: its weights ``params`` (theta*_t) and Fisher ``fisher`` (F_t).

  Args:
    state: from ``init`` or an earlier ``consolidate``.
    params: the weights at the end of the stage, shaped like ``state.fisher``; copied.
    fisher: that stage's ``fisher_diagonal``.
    gamma: None: offline EWC, the exact sum of every stage's penalty (module docstring);
      0 <= gamma <= 1: online EWC, F = gamma * F + F_t and theta* = theta*_t.

  Returns:
    The new state.
  """
  if gamma is not None and not 0 <= gamma <= 1:
    raise ValueError(f"gamma={gamma!r} must be None (offline EWC) or in [0, 1] (online EWC)")
  theta = jax.tree.map(jnp.copy, _f32(params))
  count = state.consolidations + 1
  if gamma is not None:
    summed = jax.tree.map(lambda old, new: gamma * old + new, state.fisher, fisher)
    return EWCState(summed, theta, jnp.zeros((), jnp.float32), count)
  summed = jax.tree.map(jnp.add, state.fisher, fisher)

  def mean(f_old, a_old, f_new, t_new, f_sum):
    positive = f_sum > 0
    return jnp.where(
        positive, (f_old * a_old + f_new * t_new) / jnp.where(positive, f_sum, 1.0), t_new
    )

  anchor = jax.tree.map(mean, state.fisher, state.anchor, fisher, theta, summed)
  left_over = jax.tree.map(
      lambda f_old, a_old, f_new, t_new, a: jnp.sum(f_old * jnp.square(a_old - a))
      + jnp.sum(f_new * jnp.square(t_new - a)),
      state.fisher,
      state.anchor,
      fisher,
      theta,
      anchor,
  )
  return EWCState(summed, anchor, state.constant + sum(jax.tree.leaves(left_over)), count)


def penalty(params: optax.Params, state: EWCState, *, lam: float) -> jax.Array:
  """lambda / 2 * (sum_i F_i (theta_i - theta*_i)^2 + C), a float32 scalar.

  Add it to the loss once per optimizer step (not per micro-batch); its gradient is
  lambda * F * (theta - theta*).
  """
  if not lam >= 0:
    raise ValueError(f"lam={lam!r} must be >= 0")
  terms = jax.tree.map(
      lambda p, f, a: jnp.sum(f * jnp.square(p.astype(jnp.float32) - a)),
      params,
      state.fisher,
      state.anchor,
  )
  return 0.5 * lam * (sum(jax.tree.leaves(terms)) + state.constant)


def penalty_gradient(lam: float) -> optax.GradientTransformation:
  """Adds the gradient of ``penalty``, lambda * F * (theta - theta*), to the updates.

  Chain it before the optimizer (``optax.chain(penalty_gradient(lam), adamw)``): the updates
  it passes on are the gradients of loss + penalty, as differentiating the penalized loss
  gives, clipping included. Its state is the ``EWCState`` (``init`` at first, so no penalty), which
  ``consolidate`` replaces between stages; it lives in the optimizer state and so in every
  checkpoint.
  """
  if not lam >= 0:
    raise ValueError(f"lam={lam!r} must be >= 0")

  def update_fn(
      updates: optax.Updates, state: EWCState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, EWCState]:
    if params is None:
      raise ValueError("ewc.penalty_gradient needs params in update()")
    updates = jax.tree.map(
        lambda g, p, f, a: (g.astype(jnp.float32) + lam * f * (p.astype(jnp.float32) - a)).astype(
            g.dtype
        ),
        updates,
        params,
        state.fisher,
        state.anchor,
    )
    return updates, state

  return optax.GradientTransformation(init, update_fn)


class EWCMemory(NamedTuple):
  """Bytes EWC adds (whole model, before sharding)."""

  fisher: int  # F, float32, kept through later stages
  anchor: int  # theta*, float32, kept through later stages
  fisher_pass: int  # while computing F: one chunk of per-example gradients + float32 sums
  base_parameters: int

  @property
  def per_base_parameter(self) -> float:
    """Bytes per parameter kept during training (Fisher and anchor)."""
    return (self.fisher + self.anchor) / self.base_parameters


def memory_bytes(model: nnx.Module, *, examples_per_chunk: int) -> EWCMemory:
  """The extra memory of EWC for the dry-run plan, from shapes only (abstract models work)."""
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  count = sum(math.prod(p.shape) for p in params)
  grads = sum(math.prod(p.shape) * jnp.dtype(p.dtype).itemsize for p in params)
  return EWCMemory(
      fisher=4 * count,
      anchor=4 * count,
      fisher_pass=examples_per_chunk * grads + 4 * count,
      base_parameters=count,
  )
