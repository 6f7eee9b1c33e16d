"""The Elastic Weight Consolidation penalty as an optax transformation: its state (a Fisher and
an anchor), how a finished stage joins it, the penalty and its gradient.

Kirkpatrick et al. 2017 (arXiv 1612.00796), Eq. 3: training task B after task A minimizes

  L(theta) = L_B(theta) + sum_i lambda / 2 * F_i * (theta_i - theta*_A,i)^2

with F the diagonal Fisher at theta*_A (the trainer's EWC method computes it:
``epi_jax.train.methods.ewc.fisher_diagonal``).

After several stages the penalties add up. Offline (Kirkpatrick's "sum of quadratic penalties
is itself a quadratic penalty"): sum_t F_t (theta - theta*_t)^2 = F (theta - theta*)^2 + C with
F = sum_t F_t, theta* = sum_t F_t theta*_t / F and the scalar C kept, so the state stays one
Fisher and one anchor whatever the number of stages. Online EWC (Schwarz et al. 2018, arXiv
1805.06370): F <- gamma * F + F_new and theta* <- the latest weights.

>>> state = ewc.init(params)
>>> state = ewc.consolidate(state, nnx.state(model, nnx.Param), fisher)   # offline
>>> loss = task_loss + ewc.penalty(params, state, lam=100.0)

or, with the state inside the optimizer, ``optax.chain(ewc.penalty_gradient(100.0), adamw)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class EWCState(NamedTuple):
  """The penalty's quadratic; every field is an array, so it checkpoints like params."""

  fisher: Any  # like params, float32: the (summed or decayed) diagonal Fisher F
  anchor: Any  # like params, float32: theta*
  constant: jax.Array  # shape=(), float32: C of the merged offline penalties (0 online)
  consolidations: jax.Array  # shape=(), int32: stages consolidated so far


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
