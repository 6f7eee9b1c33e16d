"""Exact k-th largest of non-negative float32 scores without sorting: a radix select.

Non-negative floats order like their bit patterns read as unsigned integers, so a few
histogram passes over digit ranges fix the threshold's bits from the top. It never
sorts, never concatenates the leaves, and each pass is a scatter-add per leaf, which
also works on sharded arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from epi_jax._src.grouping import INT32_MAX, LeafIds, expand

# Below this many entries, histogram counts are exact in int32; above, they saturate at k.
_EXACT_COUNT_LIMIT = INT32_MAX
NO_THRESHOLD = np.uint32(0xFFFFFFFF)  # bit pattern above every score: nothing selected
# Digit widths of the passes over bits 30..0 (bit 31, the sign, is always 0).
_WIDTHS_FEW_BUDGETS = (15, 16)
_WIDTHS_MANY_BUDGETS = (10, 10, 11)


def kth_largest_bits(
    scores: Sequence[jax.Array | None],
    budget_ids: Sequence[LeafIds],
    k: Sequence[int],
    num_entries: int,
) -> jax.Array:
  """Bit pattern of the k-th largest score per budget, uint32 of shape (B,).

  Args:
    scores: per leaf, float32 scores >= 0, or ``None`` for a leaf that takes no part.
    budget_ids: per leaf, the budget of the whole leaf (an ``int``) or of each of its
      slices along axis 0 (a tuple), ``None`` where ``scores`` is ``None``.
    k: number of entries to select per budget.
    num_entries: total number of scores; above 2**31 the counts saturate at k.

  Returns:
    Per budget, the k-th largest score's float32 bit pattern (``NO_THRESHOLD`` where k=0).
  """
  k = np.asarray(k, np.uint32)
  num = len(k)
  widths = _WIDTHS_FEW_BUDGETS if num <= 16 else _WIDTHS_MANY_BUDGETS
  keys = [None if s is None else jax.lax.bitcast_convert_type(s, jnp.uint32) for s in scores]
  # Counts cannot overflow int32 below 2**31 entries; above, add per leaf, saturating at k.
  saturate = num_entries > _EXACT_COUNT_LIMIT
  prefix = jnp.zeros((num,), jnp.uint32)  # threshold bits found so far
  above = jnp.zeros((num,), jnp.uint32)  # entries above the current bucket (< k)
  done = 1  # bits fixed so far, sign bit included
  for width in widths:
    shift = 32 - done - width
    bins = 1 << width
    outside = num * bins  # slot of entries outside the current bucket
    hist = jnp.zeros((outside + 1,), jnp.uint32 if saturate else jnp.int32)
    for key, ids in zip(keys, budget_ids):
      if key is None:
        continue
      ndim = key.ndim
      slot = ((key >> shift) & (bins - 1)).astype(jnp.int32) + expand(
          jnp.arange(num, dtype=jnp.int32) * bins, ids, ndim
      )
      if done > 1:
        in_bucket = (key >> (shift + width)) == (expand(prefix, ids, ndim) >> (shift + width))
        slot = jnp.where(in_bucket, slot, outside)
      if saturate:
        leaf_hist = jnp.zeros((outside + 1,), jnp.int32).at[slot.reshape(-1)].add(1)
        hist = jnp.minimum(hist + leaf_hist.astype(jnp.uint32), np.append(np.repeat(k, bins), 0))
      else:
        hist = hist.at[slot.reshape(-1)].add(1)
    hist = jnp.minimum(hist[:outside].astype(jnp.uint32), np.repeat(k, bins))
    hist = hist.reshape(num, bins)
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
    above = jnp.minimum(above_next, k)
    prefix = prefix | (digit << shift)
    done += width
  return jnp.where(k > 0, prefix, NO_THRESHOLD)
