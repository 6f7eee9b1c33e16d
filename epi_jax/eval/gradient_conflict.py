"""Task Gradient Conflict (Appendix B, Eq. 15, Table 7): TGC_ij = max(0, -cos(g_i, g_j))."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from epi_jax.eval.heldout import batch_gradients


@jax.jit
def gram_matrix(grads: list) -> jax.Array:
  """G[i, j] = <g_i, g_j> over all float leaves of the gradient pytrees, in float32.

  Leaf by leaf: no gradient is ever concatenated into one vector.
  """
  leaves = [
      [x.astype(jnp.float32) for x in jax.tree.leaves(g) if jnp.issubdtype(x.dtype, jnp.floating)]
      for g in grads
  ]
  n = len(grads)
  rows = [
      [sum(jnp.vdot(a, b) for a, b in zip(leaves[i], leaves[j])) for j in range(n)]
      for i in range(n)
  ]
  return jnp.asarray(rows)


def gradient_conflict(grads: Mapping[str, object]) -> dict:
  """TGC of every pair of tasks from their gradients.

  Args:
    grads: task -> gradient pytree (all shaped alike).

  Returns:
    ``pairs``: ``"a/b"`` -> TGC (None when a gradient is zero), for the tasks in order;
    ``cosine``: ``"a/b"`` -> cos(g_a, g_b); ``average``: mean TGC over the defined pairs.
  """
  names = list(grads)
  gram = np.asarray(gram_matrix([grads[t] for t in names]), np.float64)
  pairs, cosine = {}, {}
  for i, j in itertools.combinations(range(len(names)), 2):
    key = f"{names[i]}/{names[j]}"
    norm = np.sqrt(gram[i, i] * gram[j, j])
    cosine[key] = float(np.clip(gram[i, j] / norm, -1.0, 1.0)) if norm > 0 else None
    pairs[key] = None if cosine[key] is None else max(0.0, -cosine[key])
  defined = [v for v in pairs.values() if v is not None]
  return {
      "pairs": pairs,
      "cosine": cosine,
      "average": sum(defined) / len(defined) if defined else None,
  }


def task_gradient_conflict(model, batches: Mapping[str, dict], *, num_micro: int) -> dict:
  """``gradient_conflict`` of the gradients of each task's loss on its fixed batch.

  One jitted gradient per task (the batches share one shape, so one compilation).
  """
  return gradient_conflict({t: batch_gradients(model, b, num_micro) for t, b in batches.items()})
