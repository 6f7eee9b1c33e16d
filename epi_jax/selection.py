"""Layer grouping, min-max normalization and exact sort-free top-p selection (Eq. 7-9).

The selection finds the k-th largest normalized score with a radix select over the
float32 bit patterns: non-negative floats order like their bit patterns read as
unsigned integers, so a few histogram passes over digit ranges fix the threshold bit
by bit. It never sorts, never concatenates the leaves, and each pass is a scatter-add
per leaf, which also works on sharded arrays.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Hashable, Sequence
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZE = ("layer_minmax", "none")
BUDGET = ("global", "per_layer")
LAYER_OF = ("block", "leaf")

_INT32_MAX = np.iinfo(np.int32).max
# Below this many entries, histogram counts are exact in int32; above, they saturate at k.
_EXACT_COUNT_LIMIT = _INT32_MAX
_NO_THRESHOLD = np.uint32(0xFFFFFFFF)  # bit pattern above every score: nothing selected
# A transformer block container: `layers/3`, `h/3`, `blocks/3`, or `layers_3`.
_CONTAINER = re.compile(r"^(layers|layer|blocks|block|h)$")
_CONTAINER_INDEX = re.compile(r"^(?:layers|layer|blocks|block|h)_(\d+)$")
# Names whose un-indexed leaves are stacked (scanned) blocks with a leading layer axis.
_STACKED = re.compile(r"^(layers|layer|blocks|block)$")
# Digit widths of the radix passes over bits 30..0 (bit 31, the sign, is always 0).
_WIDTHS_FEW_GROUPS = (15, 16)
_WIDTHS_MANY_GROUPS = (10, 10, 11)

LayerOf = str | Callable[[tuple[Any, ...], Any], Hashable]


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
  leaf_ids: tuple[int | tuple[int, ...] | None, ...]

  @property
  def num_eligible(self) -> int:
    return sum(self.sizes)


def is_float(leaf) -> bool:
  """Whether a leaf can be protected: an array (or struct) of a float dtype."""
  return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def _path_parts(path) -> list[str]:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.extend(p for p in re.split(r"[./]", str(getattr(key, attr))) if p)
        break
    else:
      parts.append(str(key))
  return parts


def _block_of(parts: list[str], leaf) -> int | str | None:
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


def layer_groups(tree, layer_of: LayerOf = "block") -> Groups:
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
    if (size // leaf.shape[0] if block == "stacked" else size) > _INT32_MAX:
      raise ValueError(f"leaf {jax.tree_util.keystr(path)} has {size} entries; "
                       f"leaves above {_INT32_MAX} entries are not supported.")
    if callable(layer_of):
      key = ("key", layer_of(path, leaf))
      leaf_ids.append(gid(key, str(key[1]), size))
      continue
    if block is None:
      leaf_ids.append(gid(("leaf", label), label, size))
    elif block == "stacked":
      per = size // leaf.shape[0]
      leaf_ids.append(tuple(gid(("block", i), f"block/{i}", per)
                            for i in range(leaf.shape[0])))
    else:
      leaf_ids.append(gid(("block", block), f"block/{block}", size))
  for name, size in zip(names, sizes):
    if size > _INT32_MAX:
      raise ValueError(f"group {name!r} has {size} entries; groups above "
                       f"{_INT32_MAX} entries are not supported: use layer_of='leaf'.")
  return Groups(tuple(names), tuple(sizes), tuple(leaf_ids))


def _expand(values: jax.Array, ids, ndim: int) -> jax.Array:
  """Per-group ``values`` gathered for a leaf: a scalar or a (L, 1, ...) column."""
  if isinstance(ids, int):
    return values[ids]
  return values[np.asarray(ids)].reshape((len(ids),) + (1,) * (ndim - 1))


def _reduce(leaf: jax.Array, ids, fn) -> jax.Array:
  if isinstance(ids, int):
    return fn(leaf)
  return fn(leaf.reshape(len(ids), -1), axis=1)


def group_minmax(leaves: Sequence[jax.Array], groups: Groups):
  """Per-group minimum and maximum (Eq. 7) as float32 arrays of shape (G,)."""
  num = len(groups.names)
  lo = jnp.full((num,), jnp.inf, jnp.float32)
  hi = jnp.full((num,), -jnp.inf, jnp.float32)
  for leaf, ids in zip(leaves, groups.leaf_ids):
    if ids is None:
      continue
    leaf = leaf.astype(jnp.float32)
    lo = lo.at[np.asarray(ids)].min(_reduce(leaf, ids, jnp.min))
    hi = hi.at[np.asarray(ids)].max(_reduce(leaf, ids, jnp.max))
  return lo, hi


def group_code_counts(codes: Sequence[jax.Array | None], groups: Groups,
                      num_codes: int) -> jax.Array:
  """Per-group histogram of small integer codes, int32 of shape (G, num_codes).

  One scatter pass per leaf counts any number of boolean combinations at once (e.g.
  code = new + 2 * old for locked/freed counts); ``None`` leaves are skipped.
  """
  total = jnp.zeros((len(groups.names) * num_codes,), jnp.int32)
  for code, ids in zip(codes, groups.leaf_ids):
    if ids is None:
      continue
    slot = code.astype(jnp.int32) + _expand(
        jnp.arange(len(groups.names), dtype=jnp.int32) * num_codes, ids, code.ndim)
    total = total.at[slot.reshape(-1)].add(1)
  return total.reshape(len(groups.names), num_codes)


def normalized_scores(leaves, groups: Groups, normalize: str) -> list[jax.Array | None]:
  """Scores I >= 0 in float32 (Eq. 8), ``None`` for ineligible leaves.

  ``"layer_minmax"`` maps each group to [0, 1] (a group whose max equals its min
  scores 0); ``"none"`` keeps the raw scores. Negative and NaN scores become 0, which
  is never protected.
  """
  if normalize == "layer_minmax":
    lo, hi = group_minmax(leaves, groups)
    span = hi - lo
  out = []
  for leaf, ids in zip(leaves, groups.leaf_ids):
    if ids is None:
      out.append(None)
      continue
    leaf = leaf.astype(jnp.float32)
    if normalize == "layer_minmax":
      ndim = leaf.ndim
      s = _expand(span, ids, ndim)
      leaf = jnp.where(s > 0, (leaf - _expand(lo, ids, ndim)) / jnp.where(s > 0, s, 1), 0)
    out.append(jnp.where(leaf > 0, leaf, 0))
  return out


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

  def thresholds(self, scores: Sequence[jax.Array | None]) -> jax.Array:
    """Bit pattern of the k-th largest score per budget (uint32, 2**32-1 when k=0)."""
    k = np.asarray(self.k, np.uint32)
    num = len(self.k)
    widths = _WIDTHS_FEW_GROUPS if num <= 16 else _WIDTHS_MANY_GROUPS
    keys = [None if s is None else jax.lax.bitcast_convert_type(s, jnp.uint32) for s in scores]
    sel_ids = [None if ids is None else (self.sel_of_group[ids] if isinstance(ids, int)
                                          else tuple(self.sel_of_group[i] for i in ids))
               for ids in self.groups.leaf_ids]
    # Counts cannot overflow int32 below 2**31 entries; above, add per leaf, saturating at k.
    saturate = self.groups.num_eligible > _EXACT_COUNT_LIMIT
    prefix = jnp.zeros((num,), jnp.uint32)   # threshold bits found so far
    above = jnp.zeros((num,), jnp.uint32)    # entries above the current bucket (< k)
    done = 1                                 # bits fixed so far, sign bit included
    for width in widths:
      shift = 32 - done - width
      bins = 1 << width
      outside = num * bins                   # slot of entries outside the current bucket
      hist = jnp.zeros((outside + 1,), jnp.uint32 if saturate else jnp.int32)
      for key, ids in zip(keys, sel_ids):
        if key is None:
          continue
        ndim = key.ndim
        slot = ((key >> shift) & (bins - 1)).astype(jnp.int32) + _expand(
            jnp.arange(num, dtype=jnp.int32) * bins, ids, ndim)
        if done > 1:
          in_bucket = (key >> (shift + width)) == (_expand(prefix, ids, ndim) >> (shift + width))
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
            lambda a, b: jnp.minimum(a + b, k[:, None]), hist, reverse=True, axis=1)
      else:
        at_or_above = jax.lax.cumsum(hist, axis=1, reverse=True)
      at_or_above = jnp.minimum(at_or_above + above[:, None], k[:, None])
      digit = (jnp.sum(at_or_above >= k[:, None], axis=1) - 1).astype(jnp.uint32)
      nxt = jnp.minimum(digit + 1, bins - 1)
      above_next = jnp.where(digit + 1 < bins,
                             jnp.take_along_axis(at_or_above, nxt[:, None].astype(jnp.int32), 1)[:, 0],
                             above)
      above = jnp.minimum(above_next, k)
      prefix = prefix | (digit << shift)
      done += width
    return jnp.where(k > 0, prefix, _NO_THRESHOLD)

  def __call__(self, scores: Sequence[jax.Array]) -> tuple[list[jax.Array | None], jax.Array]:
    """Masks (bool, ``None`` for ineligible leaves) and thresholds per budget (float32)."""
    normed = normalized_scores(scores, self.groups, self.normalize)
    tau = self.thresholds(normed)
    sel = np.asarray(self.sel_of_group, np.int32)
    masks = []
    for s, ids in zip(normed, self.groups.leaf_ids):
      if s is None:
        masks.append(None)
        continue
      key = jax.lax.bitcast_convert_type(s, jnp.uint32)
      t = _expand(tau[sel], ids, s.ndim)
      masks.append((key >= t) & (key > 0))
    tau_f = jnp.where(tau == _NO_THRESHOLD, jnp.inf,
                      jax.lax.bitcast_convert_type(tau, jnp.float32))
    return masks, tau_f


def check_layer_of(layer_of) -> None:
  if not callable(layer_of) and layer_of not in LAYER_OF:
    raise ValueError(f"layer_of must be one of {LAYER_OF} or a callable (path, leaf) -> key, "
                     f"got {layer_of!r}.")


def check_selection_args(p, normalize, budget, layer_of) -> None:
  """Raises ValueError naming the first out-of-range selection argument."""
  if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
    raise ValueError(f"p must be a number with 0 <= p < 1, got {p!r}.")
  if normalize not in NORMALIZE:
    raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}.")
  if budget not in BUDGET:
    raise ValueError(f"budget must be one of {BUDGET}, got {budget!r}.")
  check_layer_of(layer_of)


def make_selector(tree, p: float, *, normalize: str = "layer_minmax", budget: str = "global",
                  layer_of: LayerOf = "block") -> Selector:
  """Plans the top-p selection for pytrees shaped like ``tree`` (arguments as in top_p_mask)."""
  check_selection_args(p, normalize, budget, layer_of)
  groups = layer_groups(tree, layer_of)
  if budget == "global":
    sel_of_group = (0,) * len(groups.names)
    k = (num_protected(p, groups.num_eligible),)
  else:
    sel_of_group = tuple(range(len(groups.names)))
    k = tuple(num_protected(p, size) for size in groups.sizes)
  if max(k, default=0) > _INT32_MAX:
    raise ValueError(f"p={p} protects {max(k)} entries; at most {_INT32_MAX} are supported "
                     f"(lower p).")
  return Selector(groups, normalize, sel_of_group, k)


def fill_ineligible(leaves, like_leaves) -> list:
  """Replaces the ``None`` entries of ``leaves`` by all-False masks shaped like ``like``."""
  return [jnp.zeros(jnp.shape(like), jnp.bool_) if leaf is None else leaf
          for leaf, like in zip(leaves, like_leaves)]


def top_p_mask(scores, p: float, *, normalize: str = "layer_minmax", budget: str = "global",
               layer_of: LayerOf = "block"):
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
