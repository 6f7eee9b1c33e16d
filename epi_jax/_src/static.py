"""A fixed protection mask as an optax transformation: the static baselines (Table 2)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from epi_jax._src import bitmask


class StaticIsolationState(NamedTuple):
  """State of ``static_isolation``."""

  mask: Any  # the fixed mask, bits packed along the last axis
  inner_state: optax.OptState


def static_isolation(
    inner: optax.GradientTransformation, mask: Any
) -> optax.GradientTransformationExtraArgs:
  """A fixed protection mask around an inner optimizer (static baselines, Table 2).

  The inner update is zeroed wherever ``mask`` is True, weight decay included; the
  mask is kept in the state as arrays, so it is never baked into the compiled step.

  Args:
    inner: the optimizer whose updates are masked.
    mask: pytree of bool shaped like the parameters (True = frozen), e.g. from
      ``epi_jax.top_p_mask(scores, p)`` or ``epi_jax.probe_mask``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a ``StaticIsolationState``.

  >>> import jax.numpy as jnp, optax
  >>> tx = static_isolation(optax.adamw(1e-5), {"w": jnp.eye(4, dtype=bool)})
  >>> state = tx.init({"w": jnp.ones((4, 4))})
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: optax.Params) -> StaticIsolationState:
    if jax.tree.structure(params) != jax.tree.structure(mask):
      raise ValueError(
          "static_isolation: the mask's pytree structure differs from the "
          f"parameters': {jax.tree.structure(mask)} vs {jax.tree.structure(params)}."
      )
    bad = [
        jax.tree_util.keystr(path)
        for (path, m), x in zip(
            jax.tree_util.tree_flatten_with_path(mask)[0], jax.tree.leaves(params)
        )
        if jnp.shape(m) != jnp.shape(x)
    ]
    if bad:
      raise ValueError(f"static_isolation: mask shape differs from the parameter at {bad}.")
    return StaticIsolationState(
        mask=jax.tree.map(lambda m: bitmask.pack(jnp.asarray(m, jnp.bool_)), mask),
        inner_state=inner.init(params),
    )

  def update_fn(
      updates: optax.Updates,
      state: StaticIsolationState,
      params: optax.Params | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, StaticIsolationState]:
    inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    out = jax.tree.map(bitmask.zero_protected, state.mask, inner_updates)
    return out, StaticIsolationState(state.mask, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
