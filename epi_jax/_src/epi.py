"""Evolving Parameter Isolation (Algorithm 1) as an optax transformation.

Each update runs the algorithm's three phases: accumulate the sensitivity S_t (Eq. 5),
refresh the protection mask every H steps (Eq. 7-9), and zero the inner optimizer's
update on the protected entries (Eq. 12-13).

References:
  Evolving Parameter Isolation for Supervised Fine-Tuning, arXiv 2604.14010
  (Sections 2.3-2.5, Algorithm 1).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from epi_jax._src import bitmask, classes, grouping, selection
from epi_jax._src.rounding import round_bfloat16_stochastic

SENSITIVITY = ("grad_sq", "adam_nu")


class MaskStats(NamedTuple):
  """Statistics of the last mask refresh, computed inside the jitted update."""

  refreshes: jax.Array  # shape=(), int32: refreshes done so far
  last_refresh: jax.Array  # shape=(), int32: step t of the last refresh, 0 if none
  threshold: jax.Array  # shape=(B,), float32: score threshold per budget (inf: k=0)
  group_size: jax.Array  # shape=(G,), int32: eligible entries per group (constant)
  protected: jax.Array  # shape=(G,), int32: protected entries per group
  locked: jax.Array  # shape=(G,), int32: entries locked at the last refresh (Eq. 10)
  freed: jax.Array  # shape=(G,), int32: entries freed at the last refresh (Eq. 11)
  overlap_first: jax.Array  # shape=(), float32: Jaccard with the first non-empty mask
  overlap_prev: jax.Array  # shape=(), float32: Jaccard with the previous mask
  has_first: jax.Array  # shape=(), bool: whether a non-empty mask was seen


class EPIState(NamedTuple):
  """State of ``epi``: every field is an array (or a pytree of arrays)."""

  count: jax.Array  # shape=(), int32: updates done (t of the last update)
  sensitivity: Any  # S_t (Eq. 5) shaped like params; () with "adam_nu"
  mask: Any  # m_t (True = protected), bits packed along the last axis
  first_mask: Any  # the first non-empty mask, packed likewise
  stats: MaskStats
  inner_state: optax.OptState


class _Plan(NamedTuple):
  """What the update knows statically about the parameters' leaves (flattened)."""

  selector: selection.Selector  # the top-p selection over the eligible entries
  eligible: list[bool]  # per leaf: whether it may be protected
  nu: list | None  # per leaf: the inner Adam's nu, with "adam_nu"


def _check_epi_args(
    p: float,
    beta: float,
    interval: int,
    normalize: str,
    budget: str,
    layer_of: grouping.LayerOf,
    sensitivity: str,
    sensitivity_dtype: Any,
) -> None:
  selection.check_selection_args(p, normalize, budget, layer_of)
  if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
    raise ValueError(f"beta must be a number with 0 <= beta < 1, got {beta!r}.")
  if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)) or interval < 1:
    raise ValueError(f"interval must be an integer >= 1, got {interval!r}.")
  if sensitivity not in SENSITIVITY:
    raise ValueError(f"sensitivity must be one of {SENSITIVITY}, got {sensitivity!r}.")
  try:
    is_float = jnp.issubdtype(jnp.dtype(sensitivity_dtype), jnp.floating)
  except TypeError:
    is_float = False
  if not is_float:
    raise ValueError(
        f"sensitivity_dtype must be a float dtype such as jnp.float32 or "
        f"jnp.bfloat16, got {sensitivity_dtype!r}."
    )


def _find_nu(inner_state: optax.OptState, num_leaves: int) -> list | None:
  """Leaves of the inner Adam second moment, ``None`` where a leaf has none."""
  nu = optax.tree.get(inner_state, "nu")
  if nu is None:
    return None
  leaves = jax.tree.leaves(nu, is_leaf=lambda x: isinstance(x, optax.MaskedNode) or x is None)
  if len(leaves) != num_leaves:
    raise ValueError(
        f"sensitivity='adam_nu': the inner state's 'nu' has {len(leaves)} "
        f"leaves but the parameters have {num_leaves}."
    )
  return [x if hasattr(x, "dtype") else None for x in leaves]


def _plan(
    tree: Any,
    inner_state: optax.OptState,
    *,
    p: float,
    normalize: str,
    budget: str,
    layer_of: grouping.LayerOf,
    sensitivity: str,
) -> _Plan:
  """The selector, which leaves may be protected, and the inner nu leaves."""
  leaves, treedef = jax.tree.flatten(tree)
  eligible = [grouping.is_float(x) for x in leaves]
  nu = None
  if sensitivity == "adam_nu":
    nu = _find_nu(inner_state, len(leaves))
    if nu is None:
      raise ValueError(
          "sensitivity='adam_nu' needs an Adam second moment: no 'nu' field "
          f"in the inner optimizer state {type(inner_state).__name__}; use an "
          "Adam-family inner optimizer or sensitivity='grad_sq'."
      )
    eligible = [e and n is not None for e, n in zip(eligible, nu)]
  shapes = [
      jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32 if e else jnp.int32)
      for x, e in zip(leaves, eligible)
  ]
  selector = selection.make_selector(
      jax.tree.unflatten(treedef, shapes), p, normalize=normalize, budget=budget, layer_of=layer_of
  )
  return _Plan(selector, eligible, nu)


def _initial_stats(selector: selection.Selector) -> MaskStats:
  """The statistics before any refresh."""
  groups = selector.groups
  return MaskStats(
      refreshes=jnp.zeros((), jnp.int32),
      last_refresh=jnp.zeros((), jnp.int32),
      threshold=jnp.full((len(selector.k),), jnp.inf, jnp.float32),
      group_size=jnp.asarray(groups.sizes, jnp.int32),
      protected=jnp.zeros((len(groups.names),), jnp.int32),
      locked=jnp.zeros((len(groups.names),), jnp.int32),
      freed=jnp.zeros((len(groups.names),), jnp.int32),
      overlap_first=jnp.ones((), jnp.float32),
      overlap_prev=jnp.ones((), jnp.float32),
      has_first=jnp.zeros((), jnp.bool_),
  )


# Phase 1: online sensitivity accumulation.


def _ema(s: jax.Array, g: jax.Array, seed: jax.Array | None, beta: float) -> jax.Array:
  """One leaf of Eq. 5 in float32; a non-finite result keeps S_{t-1}. Rounded to bfloat16
  stochastically from ``seed``, else kept in ``s``'s dtype."""
  g = g.astype(jnp.float32)
  new = beta * s.astype(jnp.float32) + (1 - beta) * (g * g)
  new = jnp.where(jnp.isfinite(new), new, s.astype(jnp.float32))
  if seed is not None:
    return round_bfloat16_stochastic(new, seed)
  return new.astype(s.dtype)


def accumulate_sensitivity(
    sens: list, grads: list, eligible: list[bool], count: jax.Array, beta: float, dtype: jnp.dtype
) -> list:
  """S_t = beta S_{t-1} + (1 - beta) g_t^2 (Eq. 5) on the eligible leaves.

  Only a bfloat16 S takes a per-leaf seed: any leaf-specific constant makes XLA compile that
  leaf's kernel on its own.
  """
  seed = lambda i: count * len(grads) + i if dtype == jnp.bfloat16 else None
  return [
      _ema(s, g, seed(i), beta) if e else s
      for i, (s, g, e) in enumerate(zip(sens, grads, eligible))
  ]


# Phase 2: dynamic mask evolution.


def _jaccard(inter: jax.Array, union: jax.Array) -> jax.Array:
  """|a & b| / |a | b| from per-group counts (1 when both sets are empty)."""
  inter = jnp.sum(inter.astype(jnp.float32))
  union = jnp.sum(union.astype(jnp.float32))
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 1.0)


def _refresh_stats(
    counts: jax.Array, threshold: jax.Array, stats: MaskStats, count: jax.Array
) -> MaskStats:
  """The statistics of a refresh from per-group counts (G, 8) of the code new mask + 2 x
  previous mask + 4 x first mask."""
  bit = lambda b: (np.arange(8) >> b) & 1
  count_if = lambda sel: jnp.sum(counts * sel, axis=1)
  protected = count_if(bit(0))
  return MaskStats(
      refreshes=stats.refreshes + 1,
      last_refresh=count,
      threshold=threshold,
      group_size=stats.group_size,
      protected=protected,
      locked=count_if(bit(0) * (1 - bit(1))),
      freed=count_if(bit(1) * (1 - bit(0))),
      overlap_first=jnp.where(
          stats.has_first, _jaccard(count_if(bit(0) & bit(2)), count_if(bit(0) | bit(2))), 1.0
      ),
      overlap_prev=_jaccard(count_if(bit(0) & bit(1)), count_if(bit(0) | bit(1))),
      # The first non-empty mask is this one (overlap 1) unless an earlier one exists.
      has_first=stats.has_first | (jnp.sum(protected) > 0),
  )


def refresh_mask(
    selector: selection.Selector,
    scores: list,
    mask: list,
    first: list,
    stats: MaskStats,
    count: jax.Array,
) -> tuple[list, list, MaskStats]:
  """m_t from S_t: layer min-max (Eq. 7-8) and the global top-p (Eq. 9), packed.

  One loop per class of equal-shaped leaves makes each leaf's mask and counts it against
  the previous and the first mask for the statistics.
  """
  groups = selector.groups
  leaf_classes, norm, tau = selector.plan(scores)  # the classes hold the eligible leaves

  def body(leaf: tuple, rows: jax.Array, hist: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, old, fst = leaf
    new = selector.member_mask(x, rows, norm, tau)
    unpacked = lambda m: bitmask.unpack(m).astype(jnp.int32)
    code = new.astype(jnp.int32) + 2 * unpacked(old) + 4 * unpacked(fst)
    return classes.add_counts(hist, code, rows, 8, None), bitmask.pack(new)

  hist = jnp.zeros((len(groups.names) * 8,), jnp.int32)
  new = [jnp.zeros_like(m) for m in mask]  # ineligible leaves are never protected
  inputs = list(zip(scores, mask, first))
  for cls in leaf_classes:
    hist, packed = classes.scan_members(cls, inputs, body, hist)
    for leaf, m in zip(cls.members, packed):
      new[leaf] = m
  threshold = selection.threshold_values(tau)
  new_stats = _refresh_stats(hist.reshape(-1, 8), threshold, stats, count)
  take = ~stats.has_first & new_stats.has_first
  first = jax.lax.cond(take, lambda: new, lambda: list(first))
  return new, first, new_stats


def evolve_mask(
    selector: selection.Selector,
    scores: list,
    mask: list,
    first: list,
    stats: MaskStats,
    count: jax.Array,
    interval: int,
) -> tuple[list, list, MaskStats]:
  """A refreshed mask when ``count % interval == 0``, else m_{t-1}."""
  if max(selector.k) == 0:
    return mask, first, stats
  return jax.lax.cond(
      count % interval == 0,
      lambda: refresh_mask(selector, scores, mask, first, stats, count),
      lambda: (mask, first, stats),
  )


# Phase 3: sparse optimization.


def isolate(updates: list, mask: list, eligible: list[bool]) -> list:
  """The inner updates with the protected entries zeroed (Eq. 12-13)."""
  return [bitmask.zero_protected(m, u) if e else u for m, u, e in zip(mask, updates, eligible)]


def epi(
    inner: optax.GradientTransformation,
    *,
    p: float = 0.01,
    beta: float = 0.99,
    interval: int = 500,
    normalize: str = "layer_minmax",
    budget: str = "global",
    layer_of: grouping.LayerOf = "block",
    sensitivity: str = "grad_sq",
    sensitivity_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  """Evolving Parameter Isolation (Algorithm 1) around an inner optimizer.

  At every step t (from 1) the sensitivity S_t = beta S_{t-1} + (1 - beta) g_t^2 is
  updated from the raw gradients (Eq. 5); when t % interval == 0 the protection mask
  is recomputed from S_t: min-max normalization per group (Eq. 7-8) and the top-p
  entries (Eq. 9), effective for this very step. The inner update is then zeroed on
  protected entries, Adam step and decoupled weight decay alike (Eq. 12-13); the
  inner state still advances everywhere.

  Args:
    inner: the optimizer whose updates are masked, e.g. ``optax.adamw(1e-5)``.
    p: protected fraction of the float entries, ``0 <= p < 1``; 0 is the inner
      optimizer bit for bit.
    beta: EMA factor of Eq. 5, ``0 <= beta < 1`` (0: instantaneous g^2, Table 4).
      Unused with ``sensitivity="adam_nu"``, where the inner Adam's b2 plays its role.
    interval: H, refresh the mask when ``t % H == 0`` (Table 5).
    normalize: ``"layer_minmax"`` (Eq. 8) or ``"none"`` (global raw scores, Table 3).
    budget: ``"global"`` top-p (paper) or ``"per_layer"`` top-p in each group (Table 3).
    layer_of: grouping for normalization, see ``epi_jax.layer_groups``.
    sensitivity: ``"grad_sq"`` (Eq. 5) or ``"adam_nu"``, which reuses the inner Adam
      second moment (an EMA of g^2 with beta = b2) and stores no float state.
    sensitivity_dtype: dtype of S with ``"grad_sq"``; ``jnp.bfloat16`` halves it.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an ``EPIState``.

  References:
    Evolving Parameter Isolation, https://arxiv.org/abs/2604.14010

  >>> import jax.numpy as jnp, optax
  >>> tx = epi(optax.adamw(1e-5, weight_decay=0.01), p=0.01, interval=500)
  >>> state = tx.init({"w": jnp.ones((4, 4))})
  """
  _check_epi_args(p, beta, interval, normalize, budget, layer_of, sensitivity, sensitivity_dtype)
  inner = optax.with_extra_args_support(inner)
  sdt = jnp.dtype(sensitivity_dtype)

  def plan(tree: Any, inner_state: optax.OptState) -> _Plan:
    return _plan(
        tree,
        inner_state,
        p=p,
        normalize=normalize,
        budget=budget,
        layer_of=layer_of,
        sensitivity=sensitivity,
    )

  def init_fn(params: optax.Params) -> EPIState:
    inner_state = inner.init(params)
    zeros = lambda dtype: jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), dtype), params)
    return EPIState(
        count=jnp.zeros((), jnp.int32),
        sensitivity=zeros(sdt) if sensitivity == "grad_sq" else (),
        mask=jax.tree.map(bitmask.pack, zeros(jnp.bool_)),
        first_mask=jax.tree.map(bitmask.pack, zeros(jnp.bool_)),  # own buffers: no aliasing
        stats=_initial_stats(plan(params, inner_state).selector),
        inner_state=inner_state,
    )

  def update_fn(
      updates: optax.Updates, state: EPIState, params: optax.Params | None = None, **extra_args: Any
  ) -> tuple[optax.Updates, EPIState]:
    inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    count = optax.safe_increment(state.count)
    grads, treedef = jax.tree.flatten(updates)
    selector, eligible, nu = plan(updates, inner_state)
    # Phase 1: online sensitivity accumulation, from the raw gradients.
    if sensitivity == "grad_sq":
      sens = accumulate_sensitivity(
          jax.tree.leaves(state.sensitivity), grads, eligible, count, beta, sdt
      )
      scores, new_sensitivity = sens, jax.tree.unflatten(treedef, sens)
    else:
      scores, new_sensitivity = nu, ()
    # Phase 2: dynamic mask evolution, every H steps.
    mask, first, stats = evolve_mask(
        selector,
        scores,
        jax.tree.leaves(state.mask),
        jax.tree.leaves(state.first_mask),
        state.stats,
        count,
        interval,
    )
    # Phase 3: sparse optimization, the inner update off the protected set.
    out = isolate(jax.tree.leaves(inner_updates), mask, eligible)
    return jax.tree.unflatten(treedef, out), EPIState(
        count=count,
        sensitivity=new_sensitivity,
        mask=jax.tree.unflatten(treedef, mask),
        first_mask=jax.tree.unflatten(treedef, first),
        stats=stats,
        inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
