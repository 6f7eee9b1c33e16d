"""Evolving Parameter Isolation as an optax transformation, and its static baseline.

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

from epi_jax import selection

SENSITIVITY = ("grad_sq", "adam_nu")


class MaskStats(NamedTuple):
  """Statistics of the last mask refresh, computed inside the jitted update."""

  refreshes: jax.Array      # shape=(), int32: refreshes done so far
  last_refresh: jax.Array   # shape=(), int32: step t of the last refresh, 0 if none
  threshold: jax.Array      # shape=(B,), float32: score threshold per budget (inf: k=0)
  group_size: jax.Array     # shape=(G,), int32: eligible entries per group (constant)
  protected: jax.Array      # shape=(G,), int32: protected entries per group
  locked: jax.Array         # shape=(G,), int32: entries locked at the last refresh (Eq. 10)
  freed: jax.Array          # shape=(G,), int32: entries freed at the last refresh (Eq. 11)
  overlap_first: jax.Array  # shape=(), float32: Jaccard with the first non-empty mask
  overlap_prev: jax.Array   # shape=(), float32: Jaccard with the previous mask
  has_first: jax.Array      # shape=(), bool: whether a non-empty mask was seen


class EPIState(NamedTuple):
  """State of ``epi``: every field is an array (or a pytree of arrays)."""

  count: jax.Array          # shape=(), int32: updates done (t of the last update)
  sensitivity: Any          # S_t (Eq. 5) shaped like params; () with "adam_nu"
  mask: Any                 # m_t (True = protected), bits packed along the last axis
  first_mask: Any           # the first non-empty mask, packed likewise
  stats: MaskStats
  inner_state: optax.OptState


class StaticIsolationState(NamedTuple):
  """State of ``static_isolation``."""

  mask: Any                 # the fixed mask, bits packed along the last axis
  inner_state: optax.OptState


def _pack(mask: jax.Array) -> jax.Array:
  """A bool mask stored in 1 bit per entry: bits packed along the last axis.

  Leaves whose last axis is not a multiple of 8 (rare in LLMs) stay bool, so the
  packed array alone determines the mask's shape and shards like its parameter.
  """
  if mask.ndim and mask.shape[-1] % 8 == 0:
    return jnp.packbits(mask, axis=-1)
  return mask


def _unpack(packed: jax.Array) -> jax.Array:
  """Inverse of ``_pack``."""
  if packed.dtype == jnp.bool_:
    return packed
  return jnp.unpackbits(packed, axis=-1).astype(jnp.bool_)


def _jaccard(inter: jax.Array, union: jax.Array) -> jax.Array:
  """|a & b| / |a | b| from per-group counts (1 when both sets are empty)."""
  inter = jnp.sum(inter.astype(jnp.float32))
  union = jnp.sum(union.astype(jnp.float32))
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 1.0)


def _round_bfloat16_stochastic(x: jax.Array, seed: jax.Array) -> jax.Array:
  """Rounds float32 to bfloat16 up or down with probability by distance.

  Round-to-nearest loses every EMA increment below half a bfloat16 ulp (0.4%), so
  with beta=0.99 a bfloat16 S would stall; stochastic rounding keeps it unbiased.
  The random bits are a cheap integer hash of (seed, flat index): no RNG state.
  """
  h = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape) * np.uint32(0x9E3779B1)
  h = h + seed.astype(jnp.uint32) * np.uint32(0x85EBCA77)
  for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B)):
    h = (h ^ (h >> shift)) * np.uint32(mul)
  h = h ^ (h >> 16)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  up = jax.lax.bitcast_convert_type((bits + (h & 0xFFFF)) & np.uint32(0xFFFF0000), jnp.float32)
  return jnp.where(jnp.isfinite(up), up, x).astype(jnp.bfloat16)


def _find_nu(inner_state, num_leaves: int) -> list | None:
  """Leaves of the inner Adam second moment, ``None`` where a leaf has none."""
  nu = optax.tree.get(inner_state, "nu")
  if nu is None:
    return None
  leaves = jax.tree.leaves(nu, is_leaf=lambda x: isinstance(x, optax.MaskedNode) or x is None)
  if len(leaves) != num_leaves:
    raise ValueError(f"sensitivity='adam_nu': the inner state's 'nu' has {len(leaves)} "
                     f"leaves but the parameters have {num_leaves}.")
  return [x if hasattr(x, "dtype") else None for x in leaves]


def _check_epi_args(p, beta, interval, normalize, budget, layer_of, sensitivity,
                    sensitivity_dtype) -> None:
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
    raise ValueError(f"sensitivity_dtype must be a float dtype such as jnp.float32 or "
                     f"jnp.bfloat16, got {sensitivity_dtype!r}.")


def epi(
    inner: optax.GradientTransformation,
    *,
    p: float = 0.01,
    beta: float = 0.99,
    interval: int = 500,
    normalize: str = "layer_minmax",
    budget: str = "global",
    layer_of: selection.LayerOf = "block",
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
  _check_epi_args(p, beta, interval, normalize, budget, layer_of, sensitivity,
                  sensitivity_dtype)
  inner = optax.with_extra_args_support(inner)
  sdt = jnp.dtype(sensitivity_dtype)

  def plan(params, inner_state):
    """The selector, which leaves may be protected (static), and the inner nu leaves."""
    leaves, treedef = jax.tree.flatten(params)
    eligible = [selection.is_float(x) for x in leaves]
    nu = None
    if sensitivity == "adam_nu":
      nu = _find_nu(inner_state, len(leaves))
      if nu is None:
        raise ValueError("sensitivity='adam_nu' needs an Adam second moment: no 'nu' field "
                         f"in the inner optimizer state {type(inner_state).__name__}; use an "
                         "Adam-family inner optimizer or sensitivity='grad_sq'.")
      eligible = [e and n is not None for e, n in zip(eligible, nu)]
    shapes = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32 if e else jnp.int32)
              for x, e in zip(leaves, eligible)]
    selector = selection.make_selector(jax.tree.unflatten(treedef, shapes), p,
                                       normalize=normalize, budget=budget, layer_of=layer_of)
    return selector, eligible, nu

  def init_fn(params):
    inner_state = inner.init(params)
    selector, _, _ = plan(params, inner_state)
    groups = selector.groups
    zeros = lambda dtype: jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), dtype), params)
    packed_zeros = lambda: jax.tree.map(_pack, zeros(jnp.bool_))
    stats = MaskStats(
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
    return EPIState(
        count=jnp.zeros((), jnp.int32),
        sensitivity=zeros(sdt) if sensitivity == "grad_sq" else (),
        mask=packed_zeros(),
        first_mask=packed_zeros(),   # own buffers: a donated state must not alias
        stats=stats,
        inner_state=inner_state,
    )

  def ema(s, g, seed):
    g = g.astype(jnp.float32)
    new = beta * s.astype(jnp.float32) + (1 - beta) * (g * g)
    new = jnp.where(jnp.isfinite(new), new, s.astype(jnp.float32))
    if sdt == jnp.bfloat16:
      return _round_bfloat16_stochastic(new, seed)
    return new.astype(sdt)

  def refresh(selector, scores, old_packed, first, stats, count):
    groups = selector.groups
    old = [_unpack(o) for o in old_packed]
    new, threshold = selector(scores)
    new = selection.fill_ineligible(new, old)
    # One pass counts every statistic: bit 0 = new mask, 1 = previous, 2 = first.
    codes = [None if ids is None else
             n.astype(jnp.int32) + 2 * o.astype(jnp.int32) + 4 * _unpack(f)
             for n, o, f, ids in zip(new, old, first, groups.leaf_ids)]
    c = selection.group_code_counts(codes, groups, 8)
    bit = lambda b: (np.arange(8) >> b) & 1
    count_if = lambda sel: jnp.sum(c * sel, axis=1)
    protected = count_if(bit(0))
    # The first non-empty mask is this one (overlap 1) unless an earlier one exists.
    take = ~stats.has_first & (jnp.sum(protected) > 0)
    stats = MaskStats(
        refreshes=stats.refreshes + 1,
        last_refresh=count,
        threshold=threshold,
        group_size=stats.group_size,
        protected=protected,
        locked=count_if(bit(0) * (1 - bit(1))),
        freed=count_if(bit(1) * (1 - bit(0))),
        overlap_first=jnp.where(stats.has_first, _jaccard(count_if(bit(0) & bit(2)),
                                                          count_if(bit(0) | bit(2))), 1.0),
        overlap_prev=_jaccard(count_if(bit(0) & bit(1)), count_if(bit(0) | bit(1))),
        has_first=stats.has_first | take,
    )
    new = [_pack(n) for n in new]
    first = [jnp.where(take, n, f) for n, f in zip(new, first)]
    return new, first, stats

  def update_fn(updates, state, params=None, **extra_args):
    inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    count = optax.safe_increment(state.count)
    grads, treedef = jax.tree.flatten(updates)
    selector, eligible, nu = plan(updates, inner_state)

    if sensitivity == "grad_sq":
      sens = [ema(s, g, count * len(grads) + i) if e else s
              for i, (s, g, e) in enumerate(zip(jax.tree.leaves(state.sensitivity), grads,
                                                eligible))]
      scores = sens
      new_sensitivity = jax.tree.unflatten(treedef, sens)
    else:
      scores = nu
      new_sensitivity = ()

    old = jax.tree.leaves(state.mask)
    first = jax.tree.leaves(state.first_mask)
    if max(selector.k) > 0:
      mask, first, stats = jax.lax.cond(
          count % interval == 0,
          lambda: refresh(selector, scores, old, first, state.stats, count),
          lambda: (old, first, state.stats))
    else:
      mask, stats = old, state.stats

    out = [jnp.where(_unpack(m), jnp.zeros_like(u), u) if e else u
           for m, u, e in zip(mask, jax.tree.leaves(inner_updates), eligible)]
    new_state = EPIState(
        count=count,
        sensitivity=new_sensitivity,
        mask=jax.tree.unflatten(treedef, mask),
        first_mask=jax.tree.unflatten(treedef, first),
        stats=stats,
        inner_state=inner_state,
    )
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def static_isolation(inner: optax.GradientTransformation, mask) -> optax.GradientTransformationExtraArgs:
  """A fixed protection mask around an inner optimizer (static baselines, Table 2).

  The inner update is zeroed wherever ``mask`` is True, weight decay included; the
  mask is kept in the state as arrays, so it is never baked into the compiled step.

  Args:
    inner: the optimizer whose updates are masked.
    mask: pytree of bool shaped like the parameters (True = frozen), e.g. from
      ``epi_jax.top_p_mask(scores, p)`` or ``epi_jax.probe_mask``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a ``StaticIsolationState``.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    if jax.tree.structure(params) != jax.tree.structure(mask):
      raise ValueError("static_isolation: the mask's pytree structure differs from the "
                       f"parameters': {jax.tree.structure(mask)} vs {jax.tree.structure(params)}.")
    bad = [jax.tree_util.keystr(path) for (path, m), x in
           zip(jax.tree_util.tree_flatten_with_path(mask)[0], jax.tree.leaves(params))
           if jnp.shape(m) != jnp.shape(x)]
    if bad:
      raise ValueError(f"static_isolation: mask shape differs from the parameter at {bad}.")
    return StaticIsolationState(
        mask=jax.tree.map(lambda m: _pack(jnp.asarray(m, jnp.bool_)), mask),
        inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    out = jax.tree.map(lambda m, u: jnp.where(_unpack(m), jnp.zeros_like(u), u),
                       state.mask, inner_updates)
    return out, StaticIsolationState(state.mask, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def probe_mask(theta_probe, theta_0, p: float, *, normalize: str = "layer_minmax",
               budget: str = "global", layer_of: selection.LayerOf = "block"):
  """Static mask from a probe run: top-p of |theta_probe - theta_0| (CPI-FT, Table 2).

  ``normalize="layer_minmax"`` is Table 2's "Static Mask + Layer Norm"; ``"none"``
  ranks the raw update magnitudes globally.
  """
  scores = jax.tree.map(lambda a, b: jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))
                        if selection.is_float(a) else a, theta_probe, theta_0)
  return selection.top_p_mask(scores, p, normalize=normalize, budget=budget, layer_of=layer_of)


def _unwrap(x):
  """The array inside a Flax ``nnx.Variable`` (as held by ``nnx.Optimizer``), else x."""
  return x.get_value() if hasattr(x, "get_value") else x


def _find_state(state, classes):
  """The one state of ``classes`` nested in ``state`` (an optax chain, nnx.Optimizer...)."""
  found = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, classes))
           if isinstance(x, classes)]
  if len(found) != 1:
    names = " or ".join(c.__name__ for c in classes)
    raise ValueError(f"expected exactly one {names} in the optimizer state, found {len(found)}.")
  return jax.tree.map(_unwrap, found[0], is_leaf=lambda x: hasattr(x, "get_value"))


def protection_mask(state):
  """The current mask m_t, bool pytree shaped like params, from any state holding EPI's."""
  return jax.tree.map(_unpack, _find_state(state, (EPIState, StaticIsolationState)).mask)


def sensitivity(state):
  """The sensitivity S_t shaped like params (the inner Adam nu with ``"adam_nu"``)."""
  epi_state = _find_state(state, (EPIState,))
  if isinstance(epi_state.sensitivity, tuple) and not epi_state.sensitivity:
    return optax.tree.get(epi_state.inner_state, "nu")
  return epi_state.sensitivity


def refreshed(state) -> jax.Array:
  """Whether the update that produced `state` (any state holding EPI's) refreshed the mask."""
  epi_state = _find_state(state, (EPIState,))
  return (epi_state.stats.last_refresh == epi_state.count) & (epi_state.count > 0)


def mask_stats(state) -> dict[str, jax.Array]:
  """Statistics of the last refresh as a dict of small arrays, for logging.

  Keys: ``refreshes``, ``last_refresh`` (step), ``threshold`` (per budget),
  ``protected``/``locked``/``freed`` (per group, in the order of
  ``epi_jax.layer_groups(params).names``), ``protected_fraction``, ``overlap_first``
  and ``overlap_prev`` (Jaccard with the first non-empty and the previous mask).
  """
  stats = _find_state(state, (EPIState,)).stats
  total = jnp.maximum(jnp.sum(stats.group_size.astype(jnp.float32)), 1)
  return {
      "refreshes": stats.refreshes,
      "last_refresh": stats.last_refresh,
      "threshold": stats.threshold,
      "protected": stats.protected,
      "locked": stats.locked,
      "freed": stats.freed,
      "protected_fraction": jnp.sum(stats.protected.astype(jnp.float32)) / total,
      "overlap_first": stats.overlap_first,
      "overlap_prev": stats.overlap_prev,
  }
