"""Layer grouping of a parameter pytree (Eq. 7's layers) and per-group reductions.

A group is a transformer block (or one leaf outside the blocks); min-max normalization,
per-layer budgets and the mask statistics all work group by group.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from epi_jax._src.classes import LeafClass, LeafIds, scan_members

LAYER_OF = ("block", "leaf")
LayerOf = str | Callable[[tuple[Any, ...], Any], Hashable]

INT32_MAX = np.iinfo(np.int32).max
# A transformer block container: ``layers/3``, ``h/3``, ``blocks/3``, or ``layers_3``.
_CONTAINER = re.compile(r"^(layers|layer|blocks|block|h)$")
_CONTAINER_INDEX = re.compile(r"^(?:layers|layer|blocks|block|h)_(\d+)$")
# Names whose un-indexed leaves are stacked (scanned) blocks with a leading layer axis.
_STACKED = re.compile(r"^(layers|layer|blocks|block)$")


@dataclasses.dataclass(frozen=True)
class Groups:
  """Static assignment of the eligible entries of a pytree to normalization groups.

  Attributes:
    names: one label per group, e.g. ``"block/3"`` or ``"embed/embedding"``.
    sizes: number of eligible entries per group.
    leaf_ids: per flattened leaf, ``None`` (not eligible: non-float), an ``int``
      (the whole leaf is in that group) or a tuple of ints (a stacked leaf whose
      slices along axis 0 belong to those groups).
  """

  names: tuple[str, ...]
  sizes: tuple[int, ...]
  leaf_ids: tuple[LeafIds, ...]

  @property
  def num_eligible(self) -> int:
    return sum(self.sizes)


def is_float(leaf: Any) -> bool:
  """Whether a leaf can be protected: an array (or struct) of a float dtype."""
  return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def check_layer_of(layer_of: LayerOf) -> None:
  """Raises ValueError unless ``layer_of`` is one of ``LAYER_OF`` or a callable."""
  if not callable(layer_of) and layer_of not in LAYER_OF:
    raise ValueError(
        f"layer_of must be one of {LAYER_OF} or a callable (path, leaf) -> key, "
        f"got {layer_of!r}."
    )


def _path_parts(path: tuple[Any, ...]) -> list[str]:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.extend(p for p in re.split(r"[./]", str(getattr(key, attr))) if p)
        break
    else:
      parts.append(str(key))
  return parts


def _block_of(parts: list[str], leaf: Any) -> int | str | None:
  """Block index of a leaf, ``"stacked"`` for a scanned stack, ``None`` otherwise."""
  for i, part in enumerate(parts):
    if match := _CONTAINER_INDEX.match(part):
      return int(match.group(1))
    if _CONTAINER.match(part):
      nxt = parts[i + 1] if i + 1 < len(parts) else None
      if nxt is not None and nxt.isdigit():
        return int(nxt)
      if _STACKED.match(part) and jnp.ndim(leaf) >= 1:
        return "stacked"
  return None


def layer_groups(tree: Any, layer_of: LayerOf = "block") -> Groups:
  """Groups the float entries of ``tree`` for layer-wise normalization (Eq. 7).

  Args:
    tree: a pytree of arrays (or shape-dtype structs) shaped like the parameters.
    layer_of: ``"block"`` puts every leaf whose path holds a transformer block index
      (``layers/3/...``, ``layers_3``, ``h/3``, ``blocks/3``) in that block's group,
      splits a stacked leaf (``layers/...`` without index) per slice of its leading
      axis, and makes every other leaf its own group; ``"leaf"`` makes every leaf a
      group; a callable ``(path, leaf) -> hashable key`` groups leaves by key.

  Returns:
    The static ``Groups`` of the tree.
  """
  check_layer_of(layer_of)
  index: dict[Hashable, int] = {}
  names: list[str] = []
  sizes: list[int] = []

  def gid(key: Hashable, name: str, size: int) -> int:
    if key not in index:
      index[key] = len(names)
      names.append(name)
      sizes.append(0)
    sizes[index[key]] += size
    return index[key]

  leaf_ids = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not is_float(leaf):
      leaf_ids.append(None)
      continue
    size = int(np.prod(leaf.shape, dtype=np.int64))
    parts = _path_parts(path)
    label = "/".join(parts)
    block = _block_of(parts, leaf) if layer_of == "block" else None
    # Histogram bins count one group's entries in int32: a stacked leaf may exceed that
    # in total as long as each of its slices does not.
    if (size // leaf.shape[0] if block == "stacked" else size) > INT32_MAX:
      raise ValueError(
          f"leaf {jax.tree_util.keystr(path)} has {size} entries; "
          f"leaves above {INT32_MAX} entries are not supported."
      )
    if callable(layer_of):
      key = ("key", layer_of(path, leaf))
      leaf_ids.append(gid(key, str(key[1]), size))
      continue
    if block is None:
      leaf_ids.append(gid(("leaf", label), label, size))
    elif block == "stacked":
      per = size // leaf.shape[0]
      leaf_ids.append(tuple(gid(("block", i), f"block/{i}", per) for i in range(leaf.shape[0])))
    else:
      leaf_ids.append(gid(("block", block), f"block/{block}", size))
  for name, size in zip(names, sizes):
    if size > INT32_MAX:
      raise ValueError(
          f"group {name!r} has {size} entries; groups above "
          f"{INT32_MAX} entries are not supported: use layer_of='leaf'."
      )
  return Groups(tuple(names), tuple(sizes), tuple(leaf_ids))


def group_minmax(
    classes: Sequence[LeafClass], leaves: Sequence[jax.Array | None], num_groups: int
) -> tuple[jax.Array, jax.Array]:
  """Per-group minimum and maximum (Eq. 7) in float32, each of shape (num_groups,)."""

  def body(x: jax.Array, rows: jax.Array, lo_hi: jax.Array) -> tuple[jax.Array, None]:
    x = x.astype(jnp.float32).reshape(rows.size, -1)  # a stacked leaf: a group per slice
    extremes = jnp.stack([jnp.min(x, axis=1), -jnp.max(x, axis=1)]).reshape((2,) + rows.shape)
    return lo_hi.at[:, rows].min(extremes), None

  lo_hi = jnp.full((2, num_groups), jnp.inf, jnp.float32)
  for cls in classes:
    lo_hi, _ = scan_members(cls, leaves, body, lo_hi)
  return lo_hi[0], -lo_hi[1]
