"""Importance vs perturbation (Appendix E.4, Table 15): does the online score S rank the
parameters the way an old task's loss feels them?

Entries are sampled stratified by normalization group (the same number from every layer
group); each is moved by small Gaussian steps +eps and -eps, one entry at a time, and the
change of a held-out old-task loss is measured:

  delta_j = mean over draws of (L(theta + eps e_j) + L(theta - eps e_j)) / 2 - L(theta),

the antithetic pair cancels the first-order term g_j eps and leaves (1/2) H_jj eps^2, the
curvature that S approximates (Eq. 6). The report is Pearson r and Spearman rho between S_j
and delta_j. All perturbed losses are evaluated by one jitted program: ``jax.lax.map`` over
the perturbations with ``batch_size`` lanes vmapped at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import epi_jax


class Entries(NamedTuple):
  """Sampled parameter entries."""

  leaf: np.ndarray  # shape=(N,), int32: position of the entry's leaf in jax.tree.leaves
  index: np.ndarray  # shape=(N, D), int32: its index in that leaf (D = max leaf ndim, 0-padded)
  group: np.ndarray  # shape=(N,), int32: its normalization group (epi_jax.layer_groups)


def sample_entries(params, per_group: int, *, seed: int, layer_of: str = "block") -> Entries:
  """``per_group`` distinct float entries drawn uniformly from each normalization group (all of
  a smaller group), the groups of ``epi_jax.layer_groups(params, layer_of)``."""
  if per_group < 1:
    raise ValueError(f"per_group must be >= 1, got {per_group}")
  groups = epi_jax.layer_groups(params, layer_of)
  leaves = jax.tree.leaves(params)
  # Per group, its contiguous segments: (leaf, slice along axis 0 or None, segment shape).
  segments: list[list[tuple]] = [[] for _ in groups.names]
  for i, (leaf, ids) in enumerate(zip(leaves, groups.leaf_ids)):
    if isinstance(ids, int):
      segments[ids].append((i, None, tuple(leaf.shape)))
    elif isinstance(ids, tuple):
      for s, g in enumerate(ids):
        segments[g].append((i, s, tuple(leaf.shape[1:])))
  rng = np.random.default_rng(seed)
  width = max(leaf.ndim for leaf in leaves)
  leaf_ids, index, group = [], [], []
  for g, segs in enumerate(segments):
    sizes = np.array([int(np.prod(shape, dtype=np.int64)) for _, _, shape in segs])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for pick in rng.choice(starts[-1], min(per_group, starts[-1]), replace=False):
      k = int(np.searchsorted(starts, pick, side="right")) - 1
      i, s, shape = segs[k]
      pos = np.unravel_index(pick - starts[k], shape)
      pos = pos if s is None else (s, *pos)
      leaf_ids.append(i)
      index.append(list(pos) + [0] * (width - len(pos)))
      group.append(g)
  return Entries(
      np.asarray(leaf_ids, np.int32),
      np.asarray(index, np.int32).reshape(-1, width),
      np.asarray(group, np.int32),
  )


def values_at(tree, entries: Entries) -> np.ndarray:
  """The values of ``tree`` (shaped like the sampled params) at ``entries``, as float64."""
  leaves = jax.tree.leaves(tree)
  out = np.zeros(len(entries.leaf), np.float64)
  for i in np.unique(entries.leaf):
    rows = np.flatnonzero(entries.leaf == i)
    pos = tuple(entries.index[rows, d] for d in range(leaves[i].ndim))
    out[rows] = np.asarray(jax.device_get(jnp.asarray(leaves[i])[pos]), np.float64)
  return out


@functools.partial(jax.jit, static_argnames=("loss_fn", "chunk"))
def _lane_losses(params, aux, leaf, index, eps, *, loss_fn: Callable, chunk: int):
  """loss_fn(params with eps[k] added at (leaf[k], index[k]), aux) for every lane k."""
  leaves, treedef = jax.tree.flatten(params)

  def one(lane):
    lane_leaf, lane_index, lane_eps = lane
    moved = []
    for i, x in enumerate(leaves):
      if not jnp.issubdtype(x.dtype, jnp.floating):
        moved.append(x)
        continue
      pos = tuple(jnp.minimum(lane_index[d], x.shape[d] - 1) for d in range(x.ndim))
      moved.append(x.at[pos].add(jnp.where(lane_leaf == i, lane_eps, 0).astype(x.dtype)))
    return loss_fn(jax.tree.unflatten(treedef, moved), aux)

  return jax.lax.map(one, (leaf, index, eps), batch_size=chunk)


def perturbation_deltas(
    loss_fn: Callable,
    params,
    aux,
    entries: Entries,
    *,
    sigma: float,
    draws: int,
    seed: int,
    chunk: int,
) -> np.ndarray:
  """delta_j (module docstring) of every entry, float64.

  Args:
    loss_fn: ``loss_fn(params, aux) -> scalar``, traceable; the same function object on
      every call keeps the compiled program.
    params: the parameter pytree; aux: anything else the loss needs (passed, not captured).
    entries: from ``sample_entries``.
    sigma: standard deviation of eps.
    draws: Gaussian draws per entry (each evaluated at +eps and -eps).
    seed: seed of the draws.
    chunk: perturbations evaluated at once (vmapped); memory grows with it.
  """
  n = len(entries.leaf)
  eps = np.random.default_rng(seed).normal(0.0, sigma, (n, draws))
  # Lane 0 is the unperturbed loss; lanes are padded with it to a multiple of ``chunk``, so
  # every lane runs in the same vmapped program.
  signed = np.stack([eps, -eps], axis=-1).reshape(-1)
  lanes = 1 + len(signed)
  pad = -lanes % chunk
  leaf = np.concatenate([[0], np.repeat(entries.leaf, 2 * draws), np.zeros(pad)])
  index = np.concatenate(
      [
          np.zeros((1, entries.index.shape[1])),
          np.repeat(entries.index, 2 * draws, axis=0),
          np.zeros((pad, entries.index.shape[1])),
      ]
  )
  steps = np.concatenate([[0.0], signed, np.zeros(pad)])
  losses = np.asarray(
      _lane_losses(
          params,
          aux,
          jnp.asarray(leaf, jnp.int32),
          jnp.asarray(index, jnp.int32),
          jnp.asarray(steps, jnp.float32),
          loss_fn=loss_fn,
          chunk=chunk,
      ),
      np.float64,
  )
  moved = losses[1:lanes].reshape(n, draws, 2)
  return (moved.mean(axis=-1) - losses[0]).mean(axis=-1)


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 1..n, ties sharing their average rank."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(1, len(x) + 1)
  values, inverse = np.unique(x, return_inverse=True)
  sums = np.bincount(inverse, weights=ranks, minlength=len(values))
  return (sums / np.bincount(inverse, minlength=len(values)))[inverse]


def pearson(x, y) -> float | None:
  """Pearson's r in float64; None when either input is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x, y = x - x.mean(), y - y.mean()
  denom = np.sqrt(np.sum(x * x) * np.sum(y * y))
  return float(np.sum(x * y) / denom) if denom > 0 else None


def spearman(x, y) -> float | None:
  """Spearman's rho: Pearson's r of the ranks (average ranks for ties)."""
  return pearson(_ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64)))


def importance_vs_perturbation(
    loss_fn: Callable,
    params,
    aux,
    sensitivity,
    *,
    per_group: int,
    draws: int,
    sigma_rel: float,
    seed: int,
    layer_of: str,
    chunk: int,
) -> dict:
  """Pearson r and Spearman rho between S and delta on entries sampled per group.

  Args:
    loss_fn, params, aux, draws, chunk: as ``perturbation_deltas``.
    sensitivity: S, a pytree shaped like ``params`` (``epi_jax.sensitivity_of(opt_state)``).
    per_group, layer_of: as ``sample_entries``.
    sigma_rel: eps has standard deviation sigma_rel times the root mean square of all float
      parameters (one sigma for every entry, so delta compares curvatures).
    seed: seed of the sampling and of the draws.

  Returns:
    ``pearson``, ``spearman`` (None if S or delta is constant), ``n`` entries, ``sigma``.
  """
  if len(jax.tree.leaves(sensitivity)) != len(jax.tree.leaves(params)):
    raise ValueError(
        "sensitivity must be shaped like params: "
        f"{len(jax.tree.leaves(sensitivity))} leaves vs {len(jax.tree.leaves(params))}"
    )
  entries = sample_entries(params, per_group, seed=seed, layer_of=layer_of)
  floats = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
  square = sum(float(jnp.sum(jnp.square(x.astype(jnp.float32)))) for x in floats)
  sigma = sigma_rel * float(np.sqrt(square / sum(x.size for x in floats)))
  delta = perturbation_deltas(
      loss_fn, params, aux, entries, sigma=sigma, draws=draws, seed=seed + 1, chunk=chunk
  )
  s = values_at(sensitivity, entries)
  return {
      "pearson": pearson(s, delta),
      "spearman": spearman(s, delta),
      "n": len(delta),
      "sigma": sigma,
  }
