"""Top-p selection (Eq. 8-9): min-max normalization per group, then an exact threshold.

k = floor(p * d) entries per budget (all eligible entries, or each group); the
threshold is the k-th largest normalized score, found by ``radix.kth_largest_bits``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from epi_jax._src import radix
from epi_jax._src.classes import LeafClass, leaf_classes, map_leaves, view
from epi_jax._src.grouping import (
    INT32_MAX,
    Groups,
    LayerOf,
    check_layer_of,
    group_minmax,
    layer_groups,
)

NORMALIZE = ("layer_minmax", "none")
BUDGET = ("global", "per_layer")


Norm = tuple[jax.Array, jax.Array] | None  # per group (min, max - min), or None: raw scores


def normalization(
    classes: Sequence[LeafClass], leaves: Sequence[jax.Array | None], groups: Groups, normalize: str
) -> Norm:
  """Per group, the minimum and the span of Eq. 8 (``None`` with ``normalize="none"``)."""
  if normalize == "none":
    return None
  lo, hi = group_minmax(classes, leaves, len(groups.names))
  return lo, hi - lo


def normalize_leaf(leaf: jax.Array, rows: jax.Array, norm: Norm) -> jax.Array:
  """Scores I >= 0 in float32 (Eq. 8) of one leaf whose groups are ``rows``."""
  leaf = leaf.astype(jnp.float32)
  if norm is not None:
    lo, span = (view(v, rows, leaf.ndim) for v in norm)
    leaf = jnp.where(span > 0, (leaf - lo) / jnp.where(span > 0, span, 1), 0)
  return jnp.where(leaf > 0, leaf, 0)


def normalized_scores(
    leaves: Sequence[jax.Array], groups: Groups, normalize: str
) -> list[jax.Array | None]:
  """Scores I >= 0 in float32 (Eq. 8), ``None`` for ineligible leaves.

  ``"layer_minmax"`` maps each group to [0, 1] (a group whose max equals its min
  scores 0); ``"none"`` keeps the raw scores. Negative and NaN scores become 0, which
  is never protected.
  """
  classes = leaf_classes(leaves, groups.leaf_ids)
  norm = normalization(classes, leaves, groups, normalize)
  return map_leaves(classes, leaves, lambda x, rows: normalize_leaf(x, rows, norm), len(leaves))


def _key(x: jax.Array, rows: jax.Array, norm: Norm) -> jax.Array:
  """The uint32 bit patterns of a leaf's normalized scores (they order like the scores)."""
  return jax.lax.bitcast_convert_type(normalize_leaf(x, rows, norm), jnp.uint32)


def num_protected(p: float, size: int) -> int:
  """k = floor(p * d), with p read as the decimal the user wrote (0.29 * 100 = 29)."""
  return int(Fraction(str(p)) * size)


@dataclasses.dataclass(frozen=True)
class Selector:
  """A static top-p selection plan over a pytree's structure (Eq. 9).

  Attributes:
    groups: the normalization groups.
    normalize: ``"layer_minmax"`` or ``"none"``.
    sel_of_group: per normalization group, the index of its selection budget
      (all 0 for a global budget, the group itself for a per-layer budget).
    k: number of entries to protect per selection budget.
  """

  groups: Groups
  normalize: str
  sel_of_group: tuple[int, ...]
  k: tuple[int, ...]

  def budget_of(self, rows: jax.Array) -> jax.Array:
    """The selection budgets of a leaf whose groups are ``rows``."""
    return jnp.asarray(np.asarray(self.sel_of_group, np.int32))[rows]

  def _kth(self, classes: Sequence[LeafClass], scores: Sequence[Any], key_fn: Any) -> jax.Array:
    return radix.kth_largest_bits(
        classes, scores, key_fn, self.budget_of, self.k, self.groups.num_eligible
    )

  def thresholds(self, scores: Sequence[jax.Array | None]) -> jax.Array:
    """Bit pattern of the k-th largest of already normalized ``scores`` per budget (uint32,
    2**32-1 when k=0)."""
    key = lambda x, _: jax.lax.bitcast_convert_type(x, jnp.uint32)
    return self._kth(leaf_classes(scores, self.groups.leaf_ids), scores, key)

  def plan(self, scores: Sequence[jax.Array | None]) -> tuple[tuple[LeafClass, ...], Norm, Any]:
    """The classes of the eligible leaves (the others are never read), the normalization and
    the thresholds (uint32 bit patterns per budget) of raw ``scores``; ``member_mask`` then
    gives each leaf's mask.

    Each pass normalizes the raw scores where it reads them, so no normalized copy of the
    scores is kept between passes.
    """
    classes = leaf_classes(scores, self.groups.leaf_ids)
    norm = normalization(classes, scores, self.groups, self.normalize)
    tau = self._kth(classes, scores, lambda x, rows: _key(x, rows, norm))
    return classes, norm, tau

  def member_mask(self, x: jax.Array, rows: jax.Array, norm: Norm, tau: jax.Array) -> jax.Array:
    """The mask of one leaf whose groups are ``rows``: ``I >= threshold`` and ``I > 0``."""
    key = _key(x, rows, norm)
    return (key >= view(tau, self.budget_of(rows), key.ndim)) & (key > 0)

  def __call__(self, scores: Sequence[jax.Array]) -> tuple[list[jax.Array | None], jax.Array]:
    """Masks (bool, ``None`` for ineligible leaves) and thresholds per budget (float32)."""
    classes, norm, tau = self.plan(scores)
    mask = lambda x, rows: self.member_mask(x, rows, norm, tau)
    return map_leaves(classes, scores, mask, len(scores)), threshold_values(tau)


def threshold_values(tau: jax.Array) -> jax.Array:
  """Float32 thresholds from their bit patterns (inf where nothing is selected)."""
  return jnp.where(
      tau == radix.NO_THRESHOLD, jnp.inf, jax.lax.bitcast_convert_type(tau, jnp.float32)
  )


def check_selection_args(p: float, normalize: str, budget: str, layer_of: LayerOf) -> None:
  """Raises ValueError naming the first out-of-range selection argument."""
  if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
    raise ValueError(f"p must be a number with 0 <= p < 1, got {p!r}.")
  if normalize not in NORMALIZE:
    raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}.")
  if budget not in BUDGET:
    raise ValueError(f"budget must be one of {BUDGET}, got {budget!r}.")
  check_layer_of(layer_of)


def make_selector(
    tree: Any,
    p: float,
    *,
    normalize: str = "layer_minmax",
    budget: str = "global",
    layer_of: LayerOf = "block",
) -> Selector:
  """Plans the top-p selection for pytrees shaped like ``tree`` (arguments as in ``top_p_mask``)."""
  check_selection_args(p, normalize, budget, layer_of)
  groups = layer_groups(tree, layer_of)
  if budget == "global":
    sel_of_group = (0,) * len(groups.names)
    k = (num_protected(p, groups.num_eligible),)
  else:
    sel_of_group = tuple(range(len(groups.names)))
    k = tuple(num_protected(p, size) for size in groups.sizes)
  if max(k, default=0) > INT32_MAX:
    raise ValueError(
        f"p={p} protects {max(k)} entries; at most {INT32_MAX} are supported " f"(lower p)."
    )
  return Selector(groups, normalize, sel_of_group, k)


def fill_ineligible(
    leaves: Sequence[jax.Array | None], like_leaves: Sequence[Any]
) -> list[jax.Array]:
  """Replaces the ``None`` entries of ``leaves`` by all-False masks shaped like ``like``."""
  return [
      jnp.zeros(jnp.shape(like), jnp.bool_) if leaf is None else leaf
      for leaf, like in zip(leaves, like_leaves)
  ]


def top_p_mask(
    scores: Any,
    p: float,
    *,
    normalize: str = "layer_minmax",
    budget: str = "global",
    layer_of: LayerOf = "block",
) -> Any:
  """Protects the top-p fraction of a score pytree, as EPI's refresh does (Eq. 7-9).

  k = floor(p * d) over the d float entries (per group with ``budget="per_layer"``);
  the threshold is the k-th largest normalized score, exactly as a full sort gives,
  found by a radix select; ``mask = (I >= threshold) & (I > 0)``, so ties at the
  threshold are all protected and a zero score never is.

  Args:
    scores: pytree of float arrays, e.g. an EMA of squared gradients or update
      magnitudes ``|theta_probe - theta_0|``. Non-float leaves are never selected.
    p: protected fraction, ``0 <= p < 1``.
    normalize: ``"layer_minmax"`` (Eq. 8) or ``"none"`` (global raw scores).
    budget: ``"global"`` (one top-p over all entries) or ``"per_layer"``.
    layer_of: grouping, see ``layer_groups``.

  Returns:
    A pytree of bool arrays shaped like ``scores`` (True = protected).

  >>> import jax.numpy as jnp
  >>> m = top_p_mask({"w": jnp.arange(10.0)}, 0.2)
  >>> m["w"].tolist()
  [False, False, False, False, False, False, False, False, True, True]
  """
  selector = make_selector(scores, p, normalize=normalize, budget=budget, layer_of=layer_of)
  leaves, treedef = jax.tree.flatten(scores)
  masks, _ = selector(leaves)
  return jax.tree.unflatten(treedef, fill_ineligible(masks, leaves))
