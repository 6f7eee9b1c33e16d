"""Task-conditioned overlap of important parameters (Appendix E.2, Table 13).

Each task gets its own importance, the EMA of g * g over that task's batches (Eq. 5 with the
run's beta, S_0 = 0), all measured at the same parameters; its own top-p mask is selected
exactly as EPI selects (``epi_jax.top_p_mask`` with the run's normalize, budget, layer_of);
the overlap of two tasks is the Jaccard index |m_a & m_b| / |m_a | m_b| of their masks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp

import epi_jax
from epi_jax.eval.heldout import batch_gradients


@jax.jit
def _ema_sq(s, g, beta):
  """S <- beta * S + (1 - beta) * g * g, skipping non-finite entries (as EPI does)."""

  def one(s, g):
    new = beta * s + (1 - beta) * jnp.square(g.astype(jnp.float32))
    return jnp.where(jnp.isfinite(new), new, s)

  return jax.tree.map(one, s, g)


def task_importance(model, batches: Iterable[dict], *, beta: float, num_micro: int):
  """EMA of the squared gradients over ``batches``, a float32 pytree like the model's params."""
  s = None
  for batch in batches:
    g = batch_gradients(model, batch, num_micro)
    s = _ema_sq(
        jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), g) if s is None else s,
        g,
        jnp.float32(beta),
    )
  if s is None:
    raise ValueError("task_importance needs at least one batch")
  return s


_top_p_mask = jax.jit(epi_jax.top_p_mask, static_argnames=("p", "normalize", "budget", "layer_of"))


@jax.jit
def _pair_counts(masks: list) -> tuple[jax.Array, jax.Array]:
  """|m_i & m_j| and |m_i | m_j| for every pair, as [n, n] float32 arrays."""
  leaves = [jax.tree.leaves(m) for m in masks]
  n = len(masks)

  def count(i, j, op):
    return sum(jnp.sum(op(a, b), dtype=jnp.float32) for a, b in zip(leaves[i], leaves[j]))

  inter = [[count(i, j, jnp.logical_and) for j in range(n)] for i in range(n)]
  union = [[count(i, j, jnp.logical_or) for j in range(n)] for i in range(n)]
  return jnp.asarray(inter), jnp.asarray(union)


def pairwise_jaccard(masks: Mapping[str, object]) -> dict:
  """Jaccard index of every pair of boolean mask pytrees.

  Returns:
    ``pairs``: ``"a/b"`` -> |m_a & m_b| / |m_a | m_b| (None when both are empty), for the
    tasks in order; ``average``: mean over the defined pairs.
  """
  names = list(masks)
  inter, union = (jax.device_get(x) for x in _pair_counts([masks[t] for t in names]))
  pairs = {
      f"{names[i]}/{names[j]}": float(inter[i, j]) / float(union[i, j]) if union[i, j] > 0 else None
      for i, j in itertools.combinations(range(len(names)), 2)
  }
  defined = [v for v in pairs.values() if v is not None]
  return {"pairs": pairs, "average": sum(defined) / len(defined) if defined else None}


def task_overlap(
    model,
    task_batches: Mapping[str, Iterable[dict]],
    *,
    p: float,
    beta: float,
    normalize: str,
    budget: str,
    layer_of: str,
    num_micro: int,
) -> dict:
  """``pairwise_jaccard`` of the tasks' own top-p importance masks.

  Args:
    model: the decoder, as it is now.
    task_batches: task -> its batches (e.g. the first few training batches of that task).
    p, beta, normalize, budget, layer_of: as the run's EPI (``epi_jax.epi``).
    num_micro: micro-batches per batch.
  """
  masks = {
      t: _top_p_mask(
          task_importance(model, b, beta=beta, num_micro=num_micro),
          p,
          normalize=normalize,
          budget=budget,
          layer_of=layer_of,
      )
      for t, b in task_batches.items()
  }
  return pairwise_jaccard(masks)
