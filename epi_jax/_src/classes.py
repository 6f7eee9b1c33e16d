"""Per-leaf work traced once per leaf shape: the leaves of equal shape run in one loop.

XLA's compile time grows with the size of the program, and a refresh written leaf by leaf is
hundreds of copies of the same few operations for a transformer (272 leaves in SmolLM2). So
the leaves that take part are sorted into *classes* of equal shape, dtype and segment layout,
and each class runs its work in a ``lax.scan`` over its stacked members: the iteration reads
the per-segment values it needs (a group's minimum, a budget's threshold) at the member's own
rows, a traced index. Besides the stacked inputs, only one leaf's temporaries exist at a
time, and the program has one copy of the work per class, whatever the depth.

A leaf's entries belong to one segment (a normalization group or a selection budget), or, for
a stacked leaf, one per slice along axis 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LeafIds = int | tuple[int, ...] | None
# Classes of at most this many members run unrolled: the copies a loop makes (the stacked
# inputs, the rotated outputs) cost more at run time than their few kernels cost to compile.
MAX_UNROLLED = 8


@dataclasses.dataclass(frozen=True)
class LeafClass:
  """Leaves of one shape, dtype and segment layout.

  Attributes:
    members: the leaves' indices in the flattened pytree.
    rows: per member its segment, int32 of shape (n,), or its segments per slice along
      axis 0, shape (n, L), for stacked leaves.
  """

  members: tuple[int, ...]
  rows: np.ndarray


def leaf_classes(leaves: Sequence[Any], leaf_ids: Sequence[LeafIds]) -> tuple[LeafClass, ...]:
  """The classes of the leaves whose ids are not ``None``, in order of first appearance."""
  classes: dict[Any, list[int]] = {}
  for leaf, (x, ids) in enumerate(zip(leaves, leaf_ids)):
    if ids is not None:
      key = (jnp.shape(x), jnp.dtype(x.dtype), len(ids) if isinstance(ids, tuple) else None)
      classes.setdefault(key, []).append(leaf)
  return tuple(
      LeafClass(tuple(m), np.asarray([leaf_ids[i] for i in m], np.int32)) for m in classes.values()
  )


def view(values: jax.Array, rows: jax.Array, ndim: int) -> jax.Array:
  """Per-segment ``values`` at a member's ``rows``: a scalar, or a (L, 1, ...) column that
  broadcasts along a stacked leaf's slices."""
  v = values[rows]
  return v if rows.ndim == 0 else v.reshape(v.shape[:1] + (1,) * (ndim - 1))


def scan_members(
    cls: LeafClass,
    inputs: Sequence[Any],
    body: Callable[[Any, jax.Array, Any], tuple[Any, Any]],
    carry: Any,
) -> tuple[Any, list]:
  """``carry, out = body(inputs[leaf], rows, carry)`` over the members of ``cls``.

  Returns the final carry and the members' outputs (a list in member order). A class of at
  most ``MAX_UNROLLED`` members, or whose members share their rows (one program then), runs
  unrolled. Otherwise the members' inputs are stacked (one copy, which XLA shares between
  calls on the same inputs) and the loop reads one slice per iteration. The outputs leave the
  loop as separate arrays: the loop carries one per member and rotates them by one each
  iteration, appending the new one. Slicing them out of a stacked array instead compiles a
  kernel per leaf (tens of ms each on CPU); the rotation is one buffer copy per member and
  iteration, of one program.
  """
  n = len(cls.members)
  if n <= MAX_UNROLLED or (cls.rows == cls.rows[0]).all():
    outs = []
    for leaf, rows in zip(cls.members, cls.rows):  # equal rows: one program, compiled once
      carry, out = body(inputs[leaf], jnp.asarray(rows), carry)
      outs.append(out)
    return carry, outs
  members = jax.tree.map(lambda *xs: jnp.stack(xs), *[inputs[i] for i in cls.members])
  rows = jnp.asarray(cls.rows)

  def step(state: tuple[Any, tuple], xs: tuple[Any, jax.Array]) -> tuple[tuple[Any, tuple], None]:
    carry, outs = state
    carry, out = body(*xs, carry)
    return (carry, outs[1:] + (out,)), None

  out_like = jax.eval_shape(lambda: body(inputs[cls.members[0]], rows[0], carry)[1])
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_like)
  (carry, outs), _ = jax.lax.scan(step, (carry, (zeros,) * n), (members, rows))
  return carry, list(outs)


def map_leaves(
    classes: Sequence[LeafClass],
    inputs: Sequence[Any],
    fn: Callable[[Any, jax.Array], Any],
    num_leaves: int,
) -> list:
  """Per leaf ``fn(inputs[leaf], rows)``, ``None`` for the leaves of no class."""
  out: list = [None] * num_leaves
  for cls in classes:
    _, results = scan_members(cls, inputs, lambda x, rows, c: (c, fn(x, rows)), ())
    for leaf, r in zip(cls.members, results):
      out[leaf] = r
  return out


def add_counts(
    hist: jax.Array, code: jax.Array, rows: jax.Array, num_codes: int, cap: np.ndarray | None
) -> jax.Array:
  """``hist`` (flattened (segments, num_codes)) plus the counts of one leaf's ``code`` in
  ``[0, num_codes)`` at its segments ``rows``; with ``cap``, uint32 counts saturated at it."""
  code = code.astype(jnp.int32)
  slots = (code + rows.reshape(rows.shape + (1,) * (code.ndim - rows.ndim)) * num_codes).reshape(-1)
  if cap is None:
    return hist.at[slots].add(1)
  counts = jnp.zeros(hist.shape, jnp.int32).at[slots].add(1)
  return jnp.minimum(hist + counts.astype(jnp.uint32), cap)


def histograms(
    classes: Sequence[LeafClass],
    inputs: Sequence[Any],
    code_fn: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]],
    num_segments: int,
    num_codes: int,
    cap: np.ndarray | None = None,
) -> jax.Array:
  """Counts of codes per segment, shape (num_segments, num_codes), where
  ``code_fn(inputs[leaf], rows)`` gives a leaf's codes and the segments they count in (its
  ``rows`` or a mapping of them). Counts are int32; with ``cap`` (each count's cap,
  flattened) uint32, added leaf by leaf and saturated. One scatter per class."""
  hist = jnp.zeros((num_segments * num_codes,), jnp.int32 if cap is None else jnp.uint32)

  def body(x: Any, rows: jax.Array, hist: jax.Array) -> tuple[jax.Array, None]:
    code, segments = code_fn(x, rows)
    return add_counts(hist, code, segments, num_codes, cap), None

  for cls in classes:
    hist, _ = scan_members(cls, inputs, body, hist)
  return hist.reshape(num_segments, num_codes)
