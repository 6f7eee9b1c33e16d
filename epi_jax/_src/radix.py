"""Exact k-th largest of non-negative float32 scores without sorting: a radix select.

Non-negative floats order like their bit patterns read as unsigned integers, so a few
histogram passes over digit ranges fix the threshold's bits from the top. It never
sorts, never concatenates the leaves, and each pass is a scatter-add per leaf (in one loop
over the leaves of each shape, ``classes.histograms``), which also works on sharded arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from epi_jax._src import classes as leaf_classes
from epi_jax._src.grouping import INT32_MAX

# Below this many entries, histogram counts are exact in int32; above, they saturate at k.
_EXACT_COUNT_LIMIT = INT32_MAX
NO_THRESHOLD = np.uint32(0xFFFFFFFF)  # bit pattern above every score: nothing selected
# Digit widths of the passes over bits 30..0 (bit 31, the sign, is always 0).
_WIDTHS_FEW_BUDGETS = (15, 16)
_WIDTHS_MANY_BUDGETS = (10, 10, 11)


def kth_largest_bits(
    classes: Sequence[leaf_classes.LeafClass],
    scores: Sequence[Any],
    key_fn: Callable[[Any, jax.Array], jax.Array],
    budget_of: Callable[[jax.Array], jax.Array],
    k: Sequence[int],
    num_entries: int,
) -> jax.Array:
  """Bit pattern of the k-th largest score per budget, uint32 of shape (B,).

  Args:
    classes: the classes of the leaves that take part.
    scores: per leaf, its scores (any pytree ``key_fn`` reads).
    key_fn: ``key_fn(scores[leaf], rows)``, the uint32 bit patterns of a leaf's float32
      scores >= 0, computed where they are counted (e.g. a normalization, fused).
    budget_of: a leaf's budgets from its ``rows`` (same shape).
    k: number of entries to select per budget.
    num_entries: total number of scores; above 2**31 the counts saturate at k.

  Returns:
    Per budget, the k-th largest score's float32 bit pattern (``NO_THRESHOLD`` where k=0).
  """
  k = np.asarray(k, np.uint32)
  widths = _WIDTHS_FEW_BUDGETS if len(k) <= 16 else _WIDTHS_MANY_BUDGETS
  # Counts cannot overflow int32 below 2**31 entries; above, add per leaf, saturating at k.
  saturate = num_entries > _EXACT_COUNT_LIMIT
  prefix = jnp.zeros((len(k),), jnp.uint32)  # threshold bits found so far
  above = jnp.zeros((len(k),), jnp.uint32)  # entries above the current bucket (< k)
  done = 1  # bits fixed so far, sign bit included
  for width in widths:
    shift = 32 - done - width
    bins = 1 << width

    def code(
        x: Any, rows: jax.Array, shift=shift, bins=bins, width=width, done=done, prefix=prefix
    ):
      """The digit of each key, or bins where the key is outside the current bucket."""
      key = key_fn(x, rows)
      budgets = budget_of(rows)
      digit = (key >> shift) & (bins - 1)
      if done > 1:
        p = leaf_classes.view(prefix, budgets, key.ndim)
        digit = jnp.where((key >> (shift + width)) == (p >> (shift + width)), digit, bins)
      return digit, budgets

    # Saturating counts: at most k per digit; the outside slot counts nothing.
    cap = np.concatenate([np.repeat(k[:, None], bins, 1), np.zeros_like(k)[:, None]], 1)
    hist = leaf_classes.histograms(
        classes, scores, code, len(k), bins + 1, cap.reshape(-1) if saturate else None
    )
    digit, above = _next_digit(hist[:, :bins], k, above, saturate)
    prefix = prefix | (digit << shift)
    done += width
  return jnp.where(k > 0, prefix, NO_THRESHOLD)


def _next_digit(
    hist: jax.Array, k: np.ndarray, above: jax.Array, saturate: bool
) -> tuple[jax.Array, jax.Array]:
  """Per row of a bucket's digit histogram (n, bins): the k-th largest entry's digit, and the
  entries above the bucket of that digit (both uint32, shape (n,))."""
  bins = hist.shape[1]
  hist = jnp.minimum(hist.astype(jnp.uint32), k[:, None])
  # Entries at or above each digit: a suffix sum, saturated at k when it could overflow.
  if saturate:
    at_or_above = jax.lax.associative_scan(
        lambda a, b: jnp.minimum(a + b, k[:, None]), hist, reverse=True, axis=1
    )
  else:
    at_or_above = jax.lax.cumsum(hist, axis=1, reverse=True)
  at_or_above = jnp.minimum(at_or_above + above[:, None], k[:, None])
  digit = (jnp.sum(at_or_above >= k[:, None], axis=1) - 1).astype(jnp.uint32)
  nxt = jnp.minimum(digit + 1, bins - 1)
  above_next = jnp.where(
      digit + 1 < bins,
      jnp.take_along_axis(at_or_above, nxt[:, None].astype(jnp.int32), 1)[:, 0],
      above,
  )
  return digit, jnp.minimum(above_next, k)
