"""Per-segment values (a group's min, a budget's histogram) kept so that equal-shaped leaves
trace identical computations.

A leaf's entries belong to one segment (a normalization group or a selection budget), or, for
a stacked leaf, one per slice along axis 0. Indexing a per-segment vector at a leaf's own
segment puts a leaf-specific constant into every kernel of that leaf, and XLA then compiles
each leaf's kernels separately: hundreds of kernels for a transformer, tens of seconds on CPU.
So segments are arranged in *parts*, the smallest sets of segments that no leaf straddles, each
with its own array; a leaf reads and writes its part's array whole (a scalar for a one-segment
part, a vector along a stacked leaf's axis 0 for that leaf's own part), and the kernels of
equal-shaped leaves are the same program, compiled once. A leaf that covers only some of its
part (rare: e.g. a stacked leaf and an unstacked one in the same block) indexes it with
constants, which is correct, only slower to compile.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LeafIds = int | tuple[int, ...] | None


def expand(values: jax.Array, ids: int | tuple[int, ...], ndim: int) -> jax.Array:
  """Per-segment ``values`` gathered for a leaf: a scalar or a (L, 1, ...) column."""
  if isinstance(ids, int):
    return values[ids]
  return values[np.asarray(ids)].reshape((len(ids),) + (1,) * (ndim - 1))


@dataclasses.dataclass(frozen=True)
class Parts:
  """Static arrangement of segments in parts, for a flattened pytree's leaves.

  Attributes:
    leaf_ids: per leaf, its segment, its segments per slice along axis 0 (a stacked
      leaf), or ``None`` (the leaf takes no part).
    segments: per part, its segment ids, in the order of its array's rows.
    part_of: per leaf, its part (``None``: the leaf takes no part).
    local: per leaf, its rows in its part (as its ``LeafIds``), or ``None`` when it covers
      the part whole: a leaf of one segment in a one-segment part, or a stacked leaf whose
      slices are the part's rows in order.
    num_segments: number of segments.
  """

  leaf_ids: tuple[LeafIds, ...]
  segments: tuple[tuple[int, ...], ...]
  part_of: tuple[int | None, ...]
  local: tuple[LeafIds, ...]
  num_segments: int

  def split(self, values: jax.Array) -> list[jax.Array]:
    """Per-segment ``values`` (rows first) as per-part arrays."""
    if self.segments == (tuple(range(self.num_segments)),):
      return [values]
    return [values[np.asarray(s)] for s in self.segments]

  def leaf_value(self, values: Sequence[jax.Array], leaf: int, ndim: int) -> jax.Array:
    """A leaf's view of per-part ``values`` (rows first): a scalar or a (L, 1, ...) column."""
    v = values[self.part_of[leaf]]
    loc = self.local[leaf]
    if loc is not None:
      return expand(v, loc, ndim)
    stacked = isinstance(self.leaf_ids[leaf], tuple)
    return v.reshape((v.shape[0],) + (1,) * (ndim - 1) if stacked else ())

  def reduce(self, units: Sequence[jax.Array | None], op: str) -> list[jax.Array]:
    """Per part, ``op`` ("min" or "max") of the leaves' values, float32 of shape (n,).

    ``units`` holds per leaf its value (one segment) or its values per slice along axis 0
    (a stacked leaf).
    """
    combine = {"min": jnp.minimum, "max": jnp.maximum}[op]
    out: list = [None] * len(self.segments)
    for leaf, unit in enumerate(units):
      j = self.part_of[leaf]
      if j is None:
        continue
      n = len(self.segments[j])
      if self.local[leaf] is None:
        unit = unit.reshape((n,))
        out[j] = unit if out[j] is None else combine(out[j], unit)
      else:
        fill = np.inf if op == "min" else -np.inf
        base = jnp.full((n,), fill, jnp.float32) if out[j] is None else out[j]
        out[j] = getattr(base.at[np.asarray(self.local[leaf])], op)(unit)
    return out

  def histograms(
      self,
      leaves: Sequence[jax.Array | None],
      values: Sequence[Any],
      code_fn: Callable[[jax.Array, Any], jax.Array],
      num_codes: int,
      cap: np.ndarray | None = None,
  ) -> jax.Array:
    """Counts of ``code_fn(leaf, value)`` in ``[0, num_codes)`` per segment, shape
    (num_segments, num_codes), with ``values`` a pytree per leaf (e.g. ``leaf_value`` views).

    Counts are int32; with ``cap`` (the cap of each count, flattened) they are uint32,
    added leaf by leaf and saturated at the cap. XLA compiles every scatter on its own, so
    the leaves of equal shape are counted in one loop that picks a leaf and its segments'
    rows per iteration: one scatter per shape, and one leaf's codes at a time.
    """
    hist = jnp.zeros((self.num_segments * num_codes,), jnp.int32 if cap is None else jnp.uint32)

    def count(hist: jax.Array, x: jax.Array, value: Any, rows: jax.Array) -> jax.Array:
      code = code_fn(x, value).astype(jnp.int32)
      slots = code + rows.reshape(rows.shape + (1,) * (code.ndim - rows.ndim)) * num_codes
      if cap is None:
        return hist.at[slots.reshape(-1)].add(1)
      counts = jnp.zeros(hist.shape, jnp.int32).at[slots.reshape(-1)].add(1)
      return jnp.minimum(hist + counts.astype(jnp.uint32), cap)

    for members in self._classes(leaves):
      rows = np.asarray([self.leaf_ids[i] for i in members], np.int32)
      if len(members) == 1:
        hist = count(hist, leaves[members[0]], values[members[0]], rows[0])
        continue
      pick = [functools.partial(lambda i: (leaves[i], values[i]), i) for i in members]
      body = lambda m, hist, pick=pick, rows=rows: count(
          hist, *jax.lax.switch(m, pick), jnp.asarray(rows)[m]
      )
      hist = jax.lax.fori_loop(0, len(members), body, hist)
    return hist.reshape(self.num_segments, num_codes)

  def _classes(self, leaves: Sequence[jax.Array | None]) -> list[list[int]]:
    """The leaves that one loop counts: equal shape, dtype and number of segments."""
    classes: dict[Any, list[int]] = {}
    for leaf, x in enumerate(leaves):
      ids = self.leaf_ids[leaf]
      if ids is not None:
        key = (x.shape, x.dtype, isinstance(ids, tuple))
        classes.setdefault(key, []).append(leaf)
    return list(classes.values())


def make_parts(leaf_ids: Sequence[LeafIds], num_segments: int) -> Parts:
  """The finest parts no leaf straddles; rows in the order leaves first name their segments."""
  parent = list(range(num_segments))

  def root(g: int) -> int:
    while parent[g] != g:
      parent[g] = parent[parent[g]]
      g = parent[g]
    return g

  for ids in leaf_ids:
    if isinstance(ids, tuple):
      for g in ids[1:]:
        parent[root(g)] = root(ids[0])
  rows: dict[int, dict[int, None]] = {}  # part root -> its segments, ordered
  for ids in leaf_ids:
    for g in () if ids is None else (ids,) if isinstance(ids, int) else ids:
      rows.setdefault(root(g), {})[g] = None
  segments = tuple(tuple(s) for s in rows.values())
  part_index = {r: j for j, r in enumerate(rows)}
  row_of = {g: i for s in segments for i, g in enumerate(s)}
  part_of, local = [], []
  for ids in leaf_ids:
    if ids is None:
      part_of.append(None)
      local.append(None)
      continue
    j = part_index[root(ids if isinstance(ids, int) else ids[0])]
    loc = row_of[ids] if isinstance(ids, int) else tuple(row_of[g] for g in ids)
    whole = loc == tuple(range(len(segments[j]))) or (loc == 0 and len(segments[j]) == 1)
    part_of.append(j)
    local.append(None if whole else loc)
  return Parts(tuple(leaf_ids), segments, tuple(part_of), tuple(local), num_segments)
