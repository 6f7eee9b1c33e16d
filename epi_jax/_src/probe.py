"""The static baselines' mask from probe runs: top-p of how far a probe moved each weight."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from epi_jax._src import grouping, selection


def displacement(theta: Any, theta_0: Any) -> Any:
  """|theta - theta_0| in float32 on the float leaves; other leaves of ``theta`` pass."""
  return jax.tree.map(
      lambda a, b: jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))
      if grouping.is_float(a)
      else a,
      theta,
      theta_0,
  )


def probe_mask(
    theta_probe: Any,
    theta_0: Any,
    p: float,
    *,
    normalize: str = "layer_minmax",
    budget: str = "global",
    layer_of: grouping.LayerOf = "block",
) -> Any:
  """Static mask from a probe run: top-p of |theta_probe - theta_0| (CPI-FT, Table 2).

  ``normalize="layer_minmax"`` is Table 2's "Static Mask + Layer Norm"; ``"none"``
  ranks the raw update magnitudes globally. Arguments after ``p`` as in ``top_p_mask``.

  Returns:
    A pytree of bool arrays shaped like the parameters (True = protected).
  """
  return selection.top_p_mask(
      displacement(theta_probe, theta_0), p, normalize=normalize, budget=budget, layer_of=layer_of
  )
