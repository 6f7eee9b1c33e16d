"""Top-p selection (Eq. 7-9) against a full sort, and layer grouping.

Compiling a selection takes seconds on CPU, so all cases are traced into ONE jitted
function, compiled once per module.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import epi_jax
from epi_jax._src import radix, selection
import reference_epi as ref


@dataclasses.dataclass(frozen=True)
class Case:
  tree: dict
  p: float
  normalize: str = "layer_minmax"
  budget: str = "global"
  layer_of: object = "block"


def split_tree(values: np.ndarray, num_leaves: int, rng, style: str) -> dict:
  """Splits a vector into leaves of random sizes (each >= 1) named by ``style``."""
  cuts = (
      np.sort(rng.choice(np.arange(1, values.size), num_leaves - 1, replace=False))
      if num_leaves > 1
      else []
  )
  parts = np.split(values, cuts)
  if style == "blocks":
    return {"layers": [{"w": x} for x in parts[:-1]], "head": parts[-1]}
  if style == "stacked" and values.size % 4 == 0:
    return {"layers": {"w": values.reshape(4, -1)}}
  return {f"leaf{i}": x for i, x in enumerate(parts)}


def make_cases() -> dict[str, Case]:
  rng = np.random.default_rng(0)
  cases = {}
  f32 = lambda x: np.asarray(x, np.float32)
  for size in (1, 100, 5000):
    leaves = min(size, int(rng.integers(1, 7)))
    scale = 10.0 ** rng.integers(-3, 4, size=size)
    cont = f32(rng.exponential(size=size) * scale)
    cases[f"cont{size}"] = Case(split_tree(cont, leaves, rng, "blocks"), 0.05)
    if size > 1:
      cases[f"cont{size}_leaf_none"] = Case(
          split_tree(cont, leaves, rng, "flat"), 0.3, normalize="none", layer_of="leaf"
      )
  ties = f32(rng.integers(0, 4, size=600))
  cases["ties"] = Case(split_tree(ties, 5, rng, "blocks"), 0.1)
  cases["ties_per_layer"] = Case(
      split_tree(ties, 5, rng, "flat"), 0.25, budget="per_layer", layer_of="leaf"
  )
  zeros = f32(np.where(rng.random(800) < 0.95, 0, rng.random(800) + 0.5))
  cases["zeros"] = Case(split_tree(zeros, 3, rng, "flat"), 0.2, normalize="none")
  neg = f32(rng.normal(size=500))
  cases["negative_none_most"] = Case(split_tree(neg, 4, rng, "flat"), 0.8, normalize="none")
  const = {
      "a": np.full((30,), 2.5, np.float32),
      "b": f32(rng.random(30) + 1),
      "c": np.zeros((5, 6), np.float32),
  }
  cases["constant_groups"] = Case(const, 0.3, layer_of="leaf")
  cases["p0"] = Case({"a": cont[:7], "b": cont[7:]}, 0.0)
  cases["k1"] = Case({"a": f32(rng.random(70)), "b": f32(rng.random(30))}, 0.01, normalize="none")
  cases["per_layer_blocks"] = Case(
      split_tree(f32(rng.random(400)), 6, rng, "blocks"), 0.05, budget="per_layer"
  )
  # More than 16 budgets: the radix select uses its three-pass digit widths.
  many = {
      f"l{i}": f32(rng.exponential(size=int(rng.integers(5, 40))) * 10.0 ** (i % 5))
      for i in range(20)
  }
  cases["per_layer_20_groups"] = Case(many, 0.1, budget="per_layer", layer_of="leaf")
  cases["callable"] = Case(many, 0.07, layer_of=lambda path, leaf: int(path[0].key[1:]) % 3)
  cases["stacked"] = Case(
      split_tree(f32(rng.random(96) * 5), 1, rng, "stacked") | {"embed": f32(rng.random(10))}, 0.1
  )
  return cases


CASES = make_cases()
TOP_P = ("cont100", "ties", "negative_none_most", "stacked")


@pytest.fixture(scope="module")
def results():
  selectors = {
      name: selection.make_selector(
          c.tree, c.p, normalize=c.normalize, budget=c.budget, layer_of=c.layer_of
      )
      for name, c in CASES.items()
  }

  @jax.jit
  def run(trees):
    out = {}
    for name, c in CASES.items():
      sel = selectors[name]
      leaves = jax.tree.leaves(trees[name])
      normed = selection.normalized_scores(leaves, sel.groups, sel.normalize)
      bits = sel.thresholds(normed)
      if name in TOP_P:  # the public function on a few cases, Selector on every case
        mask = epi_jax.top_p_mask(
            trees[name], c.p, normalize=c.normalize, budget=c.budget, layer_of=c.layer_of
        )
        tau = jnp.where(
            bits == jnp.uint32(0xFFFFFFFF), jnp.inf, jax.lax.bitcast_convert_type(bits, jnp.float32)
        )
      else:
        masks, tau = sel(leaves)
        mask = jax.tree.unflatten(
            jax.tree.structure(trees[name]), selection.fill_ineligible(masks, leaves)
        )
      out[name] = dict(mask=mask, tau=tau, normed=normed, bits=bits)
    return out

  return selectors, jax.device_get(run({n: c.tree for n, c in CASES.items()}))


@pytest.mark.parametrize("name", sorted(CASES))
def test_top_p_mask_matches_full_sort(results, name):
  case = CASES[name]
  selectors, out = results
  groups = selectors[name].groups
  leaves = jax.tree.leaves(case.tree)
  expected, tau = ref.select_tree(
      leaves,
      groups.leaf_ids,
      len(groups.names),
      case.p,
      normalize=case.normalize,
      budget=case.budget,
  )
  got = out[name]
  chex.assert_trees_all_equal(jax.tree.leaves(got["mask"]), expected)
  # Scores <= 0 are never protected, so the reported threshold is clamped at 0.
  np.testing.assert_allclose(got["tau"], np.maximum(tau, 0), rtol=1e-6, atol=0)
  # k entries per budget, or more only through ties at the threshold.
  gid = ref.entry_groups([np.shape(x) for x in leaves], groups.leaf_ids)
  flat = np.concatenate([m.ravel() for m in expected])
  budgets = [gid >= 0] if case.budget == "global" else [gid == g for g in range(len(groups.names))]
  for b in budgets:
    k = selection.num_protected(case.p, int(b.sum()))
    assert flat[b].sum() <= k or np.isfinite(tau).any()


@pytest.mark.parametrize("name", sorted(CASES))
def test_radix_threshold_is_bit_exact(results, name):
  """The radix select returns exactly the k-th largest of its own float32 scores."""
  selectors, out = results
  sel = selectors[name]
  normed, bits = out[name]["normed"], out[name]["bits"]
  gid = ref.entry_groups([np.shape(x) for x in normed], sel.groups.leaf_ids)
  flat = np.concatenate([np.asarray(x, np.float32).ravel() for x in normed])
  budget = np.asarray(sel.sel_of_group)[gid]
  for b, k in enumerate(sel.k):
    if k == 0:
      assert bits[b] == 0xFFFFFFFF
      continue
    kth = np.sort(flat[budget == b])[::-1][k - 1]
    assert bits[b] == kth.view(np.uint32), (b, k, kth)


def test_cases_cover_the_edges(results):
  """The interesting cases actually hit their edge (so the tests above can fail)."""
  _, out = results
  count = lambda n: sum(int(m.sum()) for m in jax.tree.leaves(out[n]["mask"]))
  assert count("p0") == 0 and np.isinf(out["p0"]["tau"]).all()
  assert count("k1") == 1
  assert count("ties") > selection.num_protected(0.1, 600)  # ties all protected
  assert count("zeros") == int(
      (jax.tree.leaves(CASES["zeros"].tree)[0] > 0).sum()
      + sum(int((x > 0).sum()) for x in jax.tree.leaves(CASES["zeros"].tree)[1:])
  )
  assert not out["constant_groups"]["mask"]["a"].any()
  assert not out["constant_groups"]["mask"]["c"].any()
  assert out["negative_none_most"]["tau"][0] == 0
  assert len(out["per_layer_20_groups"]["bits"]) == 20


def names(tree, layer_of="block"):
  g = epi_jax.layer_groups(tree, layer_of)
  return g.names, g.sizes, g.leaf_ids


def test_layer_groups_block_paths():
  x = np.zeros((2, 3), np.float32)
  assert names({"params": {"layers": [{"w": x}, {"w": x, "b": x[0]}]}})[:2] == (
      ("block/0", "block/1"),
      (6, 9),
  )
  assert set(names({"layers_3": {"w": x}, "layers_10": {"w": x}})[0]) == {"block/3", "block/10"}
  assert names({"h": {"3": {"w": x}}, "ln_f": x[0]})[0] == ("block/3", "ln_f")
  assert names({"transformer": {"h": [x, x]}})[0] == ("block/0", "block/1")
  assert names({"blocks": [{"attn": x}, {"attn": x}], "head": x})[0] == (
      "block/0",
      "block/1",
      "head",
  )
  hf = {
      "model.layers.3.self_attn.q_proj.weight": x,
      "model.layers.3.mlp.up_proj.weight": x,
      "model.layers.12.mlp.up_proj.weight": x,
      "model.embed_tokens.weight": x,
      "lm_head.weight": x,
  }
  got = names(hf)
  assert set(got[0]) == {"block/3", "block/12", "model/embed_tokens/weight", "lm_head/weight"}
  assert dict(zip(got[0], got[1]))["block/3"] == 12


def test_layer_groups_stacked_and_ineligible():
  tree = {
      "layers": {"w": np.zeros((4, 2, 3), np.float32), "b": np.zeros((4, 3), np.float32)},
      "embed": np.zeros((5,), np.float32),
      "step": np.zeros((2,), np.int32),
  }
  n, sizes, ids = names(tree)
  assert n == ("embed", "block/0", "block/1", "block/2", "block/3")
  assert sizes == (5, 9, 9, 9, 9)
  assert ids == (0, (1, 2, 3, 4), (1, 2, 3, 4), None)
  n, sizes, ids = names(tree, "leaf")
  assert n == ("embed", "layers/b", "layers/w") and ids == (0, 1, 2, None)
  assert names(tree, lambda path, leaf: leaf.ndim)[0] == ("1", "2", "3")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(p=-0.1), "p"),
        (dict(p=1.0), "p"),
        (dict(normalize="x"), "normalize"),
        (dict(budget="y"), "budget"),
        (dict(layer_of="z"), "layer_of"),
    ],
)
def test_invalid_arguments(kwargs, name):
  args = dict(p=0.1) | kwargs
  with pytest.raises(ValueError, match=rf"^{name} must"):
    epi_jax.top_p_mask({"w": jnp.ones(4)}, **args)


@pytest.mark.parametrize("name", ["ties", "per_layer_blocks", "stacked", "per_layer_20_groups"])
def test_saturating_counts_match_full_sort(monkeypatch, name):
  """Above 2**31 entries counts saturate at k; forced here on small trees."""
  monkeypatch.setattr(radix, "_EXACT_COUNT_LIMIT", 0)
  case = CASES[name]
  mask = epi_jax.top_p_mask(
      case.tree, case.p, normalize=case.normalize, budget=case.budget, layer_of=case.layer_of
  )
  groups = epi_jax.layer_groups(case.tree, case.layer_of)
  expected, _ = ref.select_tree(
      jax.tree.leaves(case.tree),
      groups.leaf_ids,
      len(groups.names),
      case.p,
      normalize=case.normalize,
      budget=case.budget,
  )
  chex.assert_trees_all_equal(jax.tree.leaves(mask), expected)
