"""Equal-shaped leaves: the refresh compiles once per shape, and its masks stay exact.

XLA compiles each distinct kernel (and every scatter) on its own, so a refresh whose work
per leaf carried the leaf's group index compiled hundreds of kernels for a transformer
(benchmarks/compile_time.py). The first test counts, without timing anything, what the
compiled work grows with; the others check every mask bit and statistic on a tree that
mixes equal-shaped leaves, other shapes, bfloat16, non-float and empty leaves, and a
stacked leaf sharing its blocks with unstacked ones.
"""

from __future__ import annotations

import chex
import jax.extend.core as jex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import epi_jax
from epi_jax._src import classes
import reference_epi as ref


def decoder(num_layers: int) -> dict:
  """A decoder-shaped tree of ``num_layers`` unscanned blocks (shapes only)."""
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  block = {"q": f32(16, 16), "o": f32(16, 16), "k": f32(16, 8), "up": f32(16, 32), "n": f32(16)}
  return {"layers": [dict(block) for _ in range(num_layers)], "embed": f32(40, 16)}


def _subjaxprs(params: dict):
  for v in params.values():
    for x in v if isinstance(v, (list, tuple)) else (v,):
      if isinstance(x, jex.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jex.Jaxpr):
        yield x


def traced_work(num_layers: int) -> tuple[int, int]:
  """(scatters, distinct equations) in the jaxpr of an EPI update, sub-jaxprs included.

  An equation's identity is its primitive, parameters, operand types and constant operands
  (literals and closed-over arrays): a leaf-specific group index makes it distinct.
  """
  params = decoder(num_layers)
  tx = epi_jax.epi(optax.adamw(1e-3), p=0.05, interval=4)
  state = jax.eval_shape(tx.init, params)
  closed = jax.make_jaxpr(lambda p, s, g: tx.update(g, s, p))(params, state, params)
  consts = {v: np.asarray(c) for v, c in zip(closed.jaxpr.constvars, closed.consts)}
  scatters, distinct = 0, set()

  def visit(jaxpr):
    nonlocal scatters
    for eqn in jaxpr.eqns:
      subs = list(_subjaxprs(eqn.params))
      for sub in subs:
        visit(sub)
      scatters += eqn.primitive.name.startswith("scatter")
      operands = tuple(
          (str(x.aval), repr(x.val))
          if isinstance(x, jex.Literal)
          else (str(x.aval), consts[x].tobytes() if x in consts else None)
          for x in eqn.invars
      )
      plain = {k: v for k, v in eqn.params.items() if not list(_subjaxprs({k: v}))}
      distinct.add((eqn.primitive.name, repr(sorted(plain.items(), key=str)), operands))

  visit(closed.jaxpr)
  return scatters, len(distinct)


def test_refresh_work_does_not_grow_with_depth():
  """Twice the blocks (equal shapes, classes that loop) trace no new distinct work and no more
  scatters."""
  assert classes.MAX_UNROLLED < 9
  scatters9, distinct9 = traced_work(9)
  scatters18, distinct18 = traced_work(18)
  assert scatters18 == scatters9
  assert distinct18 == distinct9, (distinct9, distinct18)


def mixed_tree(rng, stacked: bool) -> dict:
  """Equal shapes across blocks, other shapes, bfloat16, int, None and MaskedNode leaves; with
  ``stacked``, a stacked leaf (``blocks``) whose slices share the groups of the ``layers``
  (then each block group is a part its leaves cover in part, else one they cover whole)."""
  f = lambda dtype, *s: jnp.asarray(rng.exponential(size=s) * 10.0 ** rng.integers(-2, 3), dtype)
  layers = [
      {
          "q": f(jnp.float32, 8, 8),
          "o": f(jnp.float32, 8, 8),
          "k": f(jnp.bfloat16, 8, 4),
          "v": f(jnp.bfloat16, 8, 4),
          "n": f(jnp.float32, 8),
          "step": jnp.arange(3, dtype=jnp.int32),
          "none": None,
      }
      for _ in range(4)
  ]
  tree = {
      "layers": layers,
      "embed": f(jnp.bfloat16, 10, 8),
      "head": f(jnp.float32, 8, 8),
      "masked": optax.MaskedNode(),
  }
  return tree | ({"blocks": {"w": f(jnp.float32, 4, 8, 8)}} if stacked else {})


MODES = [(layer_of, budget) for layer_of in ("block", "leaf") for budget in ("global", "per_layer")]


@pytest.fixture(params=["unrolled", "looped"])
def unrolling(request, monkeypatch):
  """Runs a test with the classes unrolled (few members) and with every class looped."""
  if request.param == "looped":
    monkeypatch.setattr(classes, "MAX_UNROLLED", 0)
  return request.param


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("normalize", ["layer_minmax", "none"])
def test_mixed_tree_masks_match_full_sort(normalize, stacked, unrolling):
  tree = mixed_tree(np.random.default_rng(1), stacked)
  p = 0.1
  masks = jax.jit(
      lambda t: [
          epi_jax.top_p_mask(t, p, normalize=normalize, budget=b, layer_of=lo) for lo, b in MODES
      ]
  )(tree)
  leaves = jax.tree.leaves(tree)
  for (layer_of, budget), mask in zip(MODES, masks):
    groups = epi_jax.layer_groups(tree, layer_of)
    expected, _ = ref.select_tree(
        leaves, groups.leaf_ids, len(groups.names), p, normalize=normalize, budget=budget
    )
    got = jax.tree.leaves(mask)
    chex.assert_trees_all_equal(got, expected)
    assert sum(int(m.sum()) for m in got) > 0


@pytest.mark.parametrize("stacked", [False, True])
def test_mixed_tree_epi_matches_reference(stacked, unrolling):
  """Masks and refresh statistics of EPI against the float64 reference, in every mode."""
  rng = np.random.default_rng(2)
  params = mixed_tree(rng, stacked)
  leaves, treedef = jax.tree.flatten(params)
  steps, interval = 6, 2
  grads = [
      [
          np.asarray(rng.normal(size=x.shape) * 10.0 ** rng.integers(-2, 2), np.float32)
          if jnp.issubdtype(x.dtype, jnp.floating)
          else np.zeros(x.shape, x.dtype)
          for x in leaves
      ]
      for _ in range(steps)
  ]
  txs = [
      epi_jax.epi(optax.adamw(1e-2), p=0.1, beta=0.5, interval=interval, budget=b, layer_of=lo)
      for lo, b in MODES
  ]

  @jax.jit
  def run(params, grads):
    out = []
    for tx in txs:
      state = tx.init(params)
      for g in grads:
        g = jax.tree.unflatten(treedef, [x.astype(y.dtype) for x, y in zip(g, leaves)])
        _, state = tx.update(g, state, params)
      out.append((epi_jax.protection_mask(state), epi_jax.mask_stats(state)))
    return out

  results = run(params, grads)
  for (layer_of, budget), (mask, stats) in zip(MODES, results):
    groups = epi_jax.layer_groups(params, layer_of)
    reference = ref.ReferenceEPI(
        [np.asarray(x, np.float64) for x in leaves],
        groups.leaf_ids,
        len(groups.names),
        learning_rate=1e-2,
        weight_decay=1e-4,
        p=0.1,
        beta=0.5,
        interval=interval,
        budget=budget,
    )
    for g in grads:
      reference.step(
          [np.asarray(jnp.asarray(x).astype(y.dtype), np.float64) for x, y in zip(g, leaves)]
      )
    chex.assert_trees_all_equal(jax.tree.leaves(mask), reference.protection_mask)
    r = reference.stats
    for key in ("protected", "locked", "freed"):
      np.testing.assert_array_equal(stats[key], getattr(r, key), err_msg=key)
    for key in ("overlap_first", "overlap_prev", "threshold"):
      np.testing.assert_allclose(stats[key], getattr(r, key), rtol=1e-6, err_msg=key)
    assert r.protected.sum() > 0 and r.refreshes == steps // interval


def test_leaves_are_classed_by_shape_with_their_groups():
  """Equal-shaped leaves share a class; each member carries its own group (a traced index)."""
  tree = decoder(3)
  groups = epi_jax.layer_groups(tree)
  leaves = jax.tree.leaves(tree)
  found = {leaves[c.members[0]].shape: c for c in classes.leaf_classes(leaves, groups.leaf_ids)}
  assert sorted(found) == sorted({(16, 16), (16, 8), (16, 32), (16,), (40, 16)})
  square = found[(16, 16)]
  assert [groups.names[g] for g in square.rows] == [f"block/{b}" for b in (0, 0, 1, 1, 2, 2)]
