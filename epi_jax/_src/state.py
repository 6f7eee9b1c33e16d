"""Reading EPI's and the static mask's state wherever it sits: in an ``optax.chain``,
``optax.MultiSteps``, ``inject_hyperparams`` or an ``nnx.Optimizer``."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax

from epi_jax._src import bitmask
from epi_jax._src.epi import EPIState
from epi_jax._src.static import StaticIsolationState


def _unwrap(x: Any) -> Any:
  """The array inside a Flax ``nnx.Variable`` (as held by ``nnx.Optimizer``), else x."""
  return x.get_value() if hasattr(x, "get_value") else x


def find_state(state: Any, classes: tuple[type, ...], *, unwrap: bool = True) -> Any:
  """The one state of ``classes`` nested in ``state``, its arrays unwrapped (``unwrap=False``:
  its leaves as ``state`` holds them, e.g. the ``nnx.Variable``s of an ``nnx.Optimizer``, to
  update in place)."""
  found = [
      x
      for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, classes))
      if isinstance(x, classes)
  ]
  if len(found) != 1:
    names = " or ".join(c.__name__ for c in classes)
    raise ValueError(f"expected exactly one {names} in the optimizer state, found {len(found)}.")
  if not unwrap:
    return found[0]
  return jax.tree.map(_unwrap, found[0], is_leaf=lambda x: hasattr(x, "get_value"))


def packed_mask(state: Any) -> Any:
  """The current mask as the state stores it (``bitmask.pack``), from EPI's or the static one."""
  return find_state(state, (EPIState, StaticIsolationState)).mask


def protection_mask(state: Any) -> Any:
  """The current mask m_t, bool pytree shaped like params, from any state holding EPI's."""
  return jax.tree.map(bitmask.unpack, packed_mask(state))


def sensitivity_of(state: Any) -> Any:
  """The sensitivity S_t shaped like params (the inner Adam nu with ``"adam_nu"``)."""
  epi_state = find_state(state, (EPIState,))
  if isinstance(epi_state.sensitivity, tuple) and not epi_state.sensitivity:
    return optax.tree.get(epi_state.inner_state, "nu")
  return epi_state.sensitivity


def sensitivity(state: Any) -> Any:
  """Deprecated alias of ``sensitivity_of``, removed in the next release."""
  warnings.warn(
      "epi_jax.sensitivity is deprecated; use epi_jax.sensitivity_of.",
      DeprecationWarning,
      stacklevel=2,
  )
  return sensitivity_of(state)


def refreshed(state: Any) -> jax.Array:
  """Whether the update that produced ``state`` (any state holding EPI's) refreshed the mask."""
  epi_state = find_state(state, (EPIState,))
  return (epi_state.stats.last_refresh == epi_state.count) & (epi_state.count > 0)


def mask_stats(state: Any) -> dict[str, jax.Array]:
  """Statistics of the last refresh as a dict of small arrays, for logging.

  Keys: ``refreshes``, ``last_refresh`` (step), ``threshold`` (per budget),
  ``protected``/``locked``/``freed`` (per group, in the order of
  ``epi_jax.layer_groups(params).names``), ``protected_fraction``, ``overlap_first``
  and ``overlap_prev`` (Jaccard with the first non-empty and the previous mask).
  """
  stats = find_state(state, (EPIState,)).stats
  total = jnp.maximum(jnp.sum(stats.group_size.astype(jnp.float32)), 1)
  return {
      "refreshes": stats.refreshes,
      "last_refresh": stats.last_refresh,
      "threshold": stats.threshold,
      "protected": stats.protected,
      "locked": stats.locked,
      "freed": stats.freed,
      "protected_fraction": jnp.sum(stats.protected.astype(jnp.float32)) / total,
      "overlap_first": stats.overlap_first,
      "overlap_prev": stats.overlap_prev,
  }
