"""epi_jax.epi(optax.adamw(...)) against the NumPy float64 reference of Algorithm 1.

Compiling one EPI step takes seconds on CPU, so every configuration of this file is
traced into ONE jitted function (a ``lax.scan`` over the steps per configuration),
compiled once per module and called with several gradient streams.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import epi_jax
from epi_jax._src.selection import num_protected
import reference_epi as ref

T = 25
LR, WD = 1e-2, 0.1


def blocks_params(rng):
  return {
      "layers": [
          {
              "w": rng.normal(size=(6, 8)).astype(np.float32),
              "b": rng.normal(size=(8,)).astype(np.float32),
          }
          for _ in range(3)
      ],
      "embed": rng.normal(size=(7, 6)).astype(np.float32),
      "head": rng.normal(size=(6, 7)).astype(np.float32),
  }


def stacked_params(rng):
  return {
      "layers": {
          "w": rng.normal(size=(3, 6, 8)).astype(np.float32),
          "b": rng.normal(size=(3, 8)).astype(np.float32),
      },
      "embed": rng.normal(size=(7, 6)).astype(np.float32),
      "head": rng.normal(size=(6, 7)).astype(np.float32),
  }


def int_params(rng):
  return {
      "layers": [{"w": rng.normal(size=(6, 8)).astype(np.float32)} for _ in range(2)],
      "step": np.arange(5, dtype=np.int32),
      "head": rng.normal(size=(8, 4)).astype(np.float32),
  }


def layer_scale(path) -> float:
  """Gradient scale of a leaf: block i gets 10**i (per slice for stacked leaves)."""
  keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
  if keys[0] == "layers" and isinstance(keys[1], int):
    return 10.0 ** keys[1]
  return {"embed": 0.1, "head": 3.0, "step": 1.0}.get(keys[0], 1.0)


def grad_stream(params, seed, steps=T):
  """Random float32 gradients (steps leading), scales differing by layer."""
  rng = np.random.default_rng(seed)

  def one(path, x):
    if not np.issubdtype(x.dtype, np.floating):
      return np.zeros((steps,) + x.shape, x.dtype)
    g = rng.normal(size=(steps,) + x.shape)
    if path[0].key == "layers" and not isinstance(getattr(path[1], "idx", None), int):
      g = g * (10.0 ** np.arange(x.shape[0])).reshape((1, -1) + (1,) * (x.ndim - 1))
    else:
      g = g * layer_scale(path)
    return g.astype(np.float32)

  return jax.tree_util.tree_map_with_path(one, params)


def inner_adamw(tree: str):
  # A float first moment keeps the integer leaf's optimizer state dtype stable in a scan.
  return optax.adamw(LR, weight_decay=WD, mu_dtype=jnp.float32 if tree == "int" else None)


@dataclasses.dataclass(frozen=True)
class Config:
  tree: str
  p: float
  beta: float
  normalize: str
  budget: str
  sensitivity: str
  interval: int
  sensitivity_dtype: object = jnp.float32

  def tx(self):
    return epi_jax.epi(
        inner_adamw(self.tree),
        p=self.p,
        beta=self.beta,
        interval=self.interval,
        normalize=self.normalize,
        budget=self.budget,
        sensitivity=self.sensitivity,
        sensitivity_dtype=self.sensitivity_dtype,
    )


# A covering set: every value of every factor appears, with both trees.
CONFIGS = {
    "a": Config("blocks", 0.05, 0.9, "layer_minmax", "global", "grad_sq", 3),
    "b": Config("stacked", 0.2, 0.0, "none", "per_layer", "grad_sq", 5),
    "c": Config("blocks", 0.2, 0.9, "layer_minmax", "per_layer", "adam_nu", 3),
    "d": Config("stacked", 0.05, 0.0, "none", "global", "adam_nu", 3),
    "e": Config("blocks", 0.2, 0.9, "none", "global", "grad_sq", 5),
}
EXTRA = {
    "bf16": Config("blocks", 0.05, 0.9, "layer_minmax", "global", "grad_sq", 3, jnp.bfloat16),
    "int": Config("int", 0.2, 0.9, "layer_minmax", "global", "grad_sq", 2),
}
NONFINITE = Config("nf", 0.2, 0.9, "layer_minmax", "global", "grad_sq", 2)
ALL = {**CONFIGS, **EXTRA, "nf": NONFINITE}
TREES = {"blocks": blocks_params, "stacked": stacked_params, "int": int_params, "nf": blocks_params}


def trajectory(tx, params, grads):
  """Per step: updates, params, sensitivity, mask, mask_stats (leading axis T)."""

  def body(carry, g):
    params, state = carry
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), dict(
        updates=updates,
        params=params,
        sens=epi_jax.sensitivity_of(state),
        mask=epi_jax.protection_mask(state),
        stats=epi_jax.mask_stats(state),
    )

  return jax.lax.scan(body, (params, tx.init(params)), grads)[1]


@pytest.fixture(scope="module")
def setup():
  params = {name: make(np.random.default_rng(i)) for i, (name, make) in enumerate(TREES.items())}
  txs = {name: cfg.tx() for name, cfg in ALL.items()}

  @jax.jit
  def run(grads):
    out = {
        name: trajectory(txs[name], params[cfg.tree], grads[cfg.tree]) for name, cfg in ALL.items()
    }
    return out

  grads = {name: grad_stream(p, 100 + i) for i, (name, p) in enumerate(params.items())}
  # Block 0's gradient holds a nan at step 3 and +-inf at step 4.
  w = grads["nf"]["layers"][0]["w"]
  w[2, 1, 2] = np.nan
  w[3, 4, 0] = np.inf
  w[3, 0, 0] = -np.inf
  return params, grads, run


@pytest.fixture(scope="module")
def base(setup):
  params, grads, run = setup
  return jax.device_get(run(grads))


def at(tree, t):
  return [np.asarray(x[t]) for x in jax.tree.leaves(tree)]


def reference_run(params, grads, cfg: Config):
  groups = epi_jax.layer_groups(params)
  r = ref.ReferenceEPI(
      jax.tree.leaves(params),
      groups.leaf_ids,
      len(groups.names),
      learning_rate=LR,
      weight_decay=WD,
      p=cfg.p,
      beta=cfg.beta,
      interval=cfg.interval,
      normalize=cfg.normalize,
      budget=cfg.budget,
      sensitivity=cfg.sensitivity,
  )
  out = []
  for t in range(T):
    r.step(at(grads, t))
    out.append(dict(params=r.params, scores=r.scores, mask=r.protection_mask, stats=r.stats))
  return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_reference(setup, base, name):
  params, grads, _ = setup
  cfg = CONFIGS[name]
  got = base[name]
  expected = reference_run(params[cfg.tree], grads[cfg.tree], cfg)
  refreshes = 0
  for t, e in enumerate(expected):
    step = t + 1
    chex.assert_trees_all_equal(at(got["mask"], t), e["mask"])
    chex.assert_trees_all_close(at(got["sens"], t), e["scores"], rtol=1e-5, atol=1e-12)
    chex.assert_trees_all_close(at(got["params"], t), e["params"], rtol=1e-5, atol=1e-6)
    if step % cfg.interval == 0:
      refreshes += 1
      s, es = {k: np.asarray(v[t]) for k, v in got["stats"].items()}, e["stats"]
      assert s["refreshes"] == refreshes == es.refreshes
      assert s["last_refresh"] == step == es.last_refresh
      np.testing.assert_array_equal(s["protected"], es.protected)
      np.testing.assert_array_equal(s["locked"], es.locked)
      np.testing.assert_array_equal(s["freed"], es.freed)
      np.testing.assert_allclose(s["threshold"], es.threshold, rtol=1e-5)
      np.testing.assert_allclose(s["overlap_prev"], es.overlap_prev, rtol=1e-6)
      np.testing.assert_allclose(s["overlap_first"], es.overlap_first, rtol=1e-6)
      d = epi_jax.layer_groups(params[cfg.tree]).num_eligible
      np.testing.assert_allclose(s["protected_fraction"], es.protected.sum() / d, rtol=1e-6)
  # The run exercised the interesting paths: masks evolved (entries locked and freed).
  later = [e["stats"] for e in expected[cfg.interval * 2 - 1 :: cfg.interval]]
  assert sum(s.freed.sum() for s in later) > 0 and sum(s.locked.sum() for s in later) > 0


def test_p0_is_bit_identical_to_inner(setup):
  """p=0: every update and parameter equals the inner optimizer's, bit for bit.

  Each optimizer is jitted on its own (one fused program could round differently)."""
  params, grads = setup[0]["blocks"], setup[1]["blocks"]
  inner = optax.adamw(LR, weight_decay=WD)
  tx = epi_jax.epi(inner, p=0.0, beta=0.9, interval=2)
  step_inner, step_epi = jax.jit(inner.update), jax.jit(tx.update)
  pa, sa, pb, sb = params, inner.init(params), params, tx.init(params)
  for t in range(T):
    g = jax.tree.map(lambda x: x[t], grads)
    ua, sa = step_inner(g, sa, pa)
    ub, sb = step_epi(g, sb, pb)
    chex.assert_trees_all_equal(ub, ua)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
    chex.assert_trees_all_equal(pb, pa)
  assert not any(np.any(m) for m in jax.tree.leaves(epi_jax.protection_mask(sb)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_protected_entries_do_not_move(setup, base, name):
  params = setup[0][CONFIGS[name].tree]
  got = base[name]
  before = [np.asarray(x) for x in jax.tree.leaves(params)]
  seen = 0
  for t in range(T):
    after, mask = at(got["params"], t), at(got["mask"], t)
    for b, a, m, u in zip(before, after, mask, at(got["updates"], t)):
      np.testing.assert_array_equal(a[m], b[m])
      np.testing.assert_array_equal(u[m], 0)
      assert np.all(a[~m] != b[~m])  # trainable entries do move (weight decay, Adam)
      seen += m.sum()
    before = after
  assert seen > 0


@pytest.mark.parametrize("name", ["b", "c", "d", "e"])
def test_number_protected_is_k_without_ties(setup, base, name):
  """Continuous random scores have no ties: exactly k per budget is protected.

  (Global layer_minmax is excluded: every group's maximum normalizes to exactly 1.)
  """
  cfg = CONFIGS[name]
  groups = epi_jax.layer_groups(setup[0][cfg.tree])
  got = base[name]
  t = cfg.interval - 1
  protected = np.asarray(got["stats"]["protected"][t])
  count = sum(int(m.sum()) for m in at(got["mask"], t))
  assert count == protected.sum()
  if cfg.budget == "global":
    assert count == num_protected(cfg.p, groups.num_eligible)
  else:
    np.testing.assert_array_equal(protected, [num_protected(cfg.p, d) for d in groups.sizes])


def test_layer_minmax_mask_is_scale_invariant(setup, base):
  """Scaling block 1's gradients by 2**5 (exact in float) keeps layer_minmax masks but
  changes the raw-score (normalize="none") masks."""
  params, grads, run = setup

  def scale(path, g):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    return g * 32 if keys[:2] == ["layers", 1] else g

  scaled = dict(grads, blocks=jax.tree_util.tree_map_with_path(scale, grads["blocks"]))
  out = jax.device_get(run(scaled))
  chex.assert_trees_all_equal(out["a"]["mask"], base["a"]["mask"])
  chex.assert_trees_all_equal(out["c"]["mask"], base["c"]["mask"])
  changed = [
      np.any(x != y)
      for x, y in zip(jax.tree.leaves(out["e"]["mask"]), jax.tree.leaves(base["e"]["mask"]))
  ]
  assert any(changed)


def test_integer_leaves_pass_through(setup, base):
  params, grads, _ = setup
  got = base["int"]
  mask = got["mask"]
  assert mask["step"].dtype == bool and not mask["step"].any()
  assert any(m.any() for m in jax.tree.leaves(mask))
  # The integer leaf's update is the inner optimizer's, untouched.
  inner = inner_adamw("int")
  state, p = inner.init(params["int"]), params["int"]
  for t in range(T):
    g = jax.tree.map(lambda x: x[t], grads["int"])
    u, state = jax.jit(inner.update)(g, state, p)
    p = optax.apply_updates(p, u)
    chex.assert_trees_all_close(u["step"], got["updates"]["step"][t], rtol=1e-6)


def test_bfloat16_sensitivity_close_to_float32(base):
  bf, f32 = base["bf16"], base["a"]
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf["sens"]))
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: x.astype(np.float32), bf["sens"]), f32["sens"], rtol=3e-2, atol=1e-30
  )
  for t in range(2, T, 3):
    a = np.concatenate([m[t].ravel() for m in jax.tree.leaves(bf["mask"])])
    b = np.concatenate([m[t].ravel() for m in jax.tree.leaves(f32["mask"])])
    assert a.sum() > 0 and ref.jaccard(a, b) >= 0.7


@pytest.fixture(scope="module")
def nonfinite(setup, base):
  """The "nf" run: block 0's gradient holds a nan at step 3 and +-inf at step 4."""
  return setup[0]["nf"], setup[1]["nf"], base["nf"]


def test_nonfinite_gradient_never_poisons_sensitivity(nonfinite):
  _, _, out = nonfinite
  chex.assert_tree_all_finite(out["sens"])
  chex.assert_tree_all_finite(out["stats"]["overlap_prev"])
  assert np.isfinite(out["stats"]["threshold"][1:]).all()  # refreshes at steps 2, 4, 6
  assert any(m.any() for m in jax.tree.leaves(out["mask"]))


def test_nonfinite_gradient_skips_only_the_affected_entries(nonfinite):
  """Departure from DESIGN.md ("affected leaves"): per entry costs no extra pass over g."""
  params, grads, out = nonfinite
  s = out["sens"]["layers"][0]["w"]
  bad = ~np.isfinite(grads["layers"][0]["w"][2])
  assert bad.any() and (~bad).any()
  np.testing.assert_array_equal(s[2][bad], s[1][bad])  # step 3: the nan entries keep S
  assert np.all(s[2][~bad] != s[1][~bad])  # the rest of the leaf updates


def test_nonfinite_matches_reference(nonfinite):
  params, grads, out = nonfinite
  cfg = NONFINITE
  groups = epi_jax.layer_groups(params)
  r = ref.ReferenceEPI(
      jax.tree.leaves(params),
      groups.leaf_ids,
      len(groups.names),
      learning_rate=LR,
      weight_decay=WD,
      p=cfg.p,
      beta=cfg.beta,
      interval=cfg.interval,
  )
  for t in range(T):
    with np.errstate(invalid="ignore"):  # the reference's Adam moments take the nan
      r.step(at(grads, t))
    got = at(out["sens"], t)
    # Leaf 0 of the flattened tree is embed, then head, then layers/0/b, layers/0/w...
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for n, a, b in zip(names, got, r.scores):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12, err_msg=n)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(p=-0.1), "p"),
        (dict(p=1.0), "p"),
        (dict(beta=1.0), "beta"),
        (dict(beta=-0.5), "beta"),
        (dict(interval=0), "interval"),
        (dict(normalize="x"), "normalize"),
        (dict(budget="y"), "budget"),
        (dict(layer_of="z"), "layer_of"),
        (dict(sensitivity="fisher"), "sensitivity"),
        (dict(sensitivity_dtype=jnp.int32), "sensitivity_dtype"),
    ],
)
def test_invalid_arguments(kwargs, name):
  with pytest.raises(ValueError, match=rf"^{name} must"):
    epi_jax.epi(optax.adamw(1e-3), **kwargs)
