"""EPI composes like any optax transformation and rejects bad input up front."""

import warnings

import chex
import flax.linen
import flax.training.train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import epi_jax


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return {
      "embed": jnp.asarray(rng.normal(size=(11, 4)), dtype),
      "layers": [
          {
              "w": jnp.asarray(rng.normal(size=(4, 4)), dtype),
              "b": jnp.asarray(rng.normal(size=(4,)), dtype),
          }
          for _ in range(3)
      ],
  }


def _grads(params, step):
  key = jax.random.fold_in(jax.random.PRNGKey(1), step)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      treedef,
      [
          (jax.random.normal(k, x.shape) * (i + 1)).astype(x.dtype)
          for i, (k, x) in enumerate(zip(keys, leaves))
      ],
  )


def _run(tx, params, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for t in range(steps):
    params, state = step(params, state, _grads(params, t))
  return params, state, step


def test_compiles_once_with_refresh_steps():
  tx = epi_jax.epi(optax.adamw(1e-2), p=0.1, interval=2)
  _, state, step = _run(tx, _params(), 5)
  assert step._cache_size() == 1
  assert int(epi_jax.mask_stats(state)["refreshes"]) == 2


def test_inside_chain_with_schedule_and_multisteps():
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 20)
  inner = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, weight_decay=0.1)
  tx = optax.MultiSteps(
      optax.chain(optax.clip_by_global_norm(1.0), epi_jax.epi(inner, p=0.1, interval=2)),
      every_k_schedule=2,
  )
  params, state, _ = _run(tx, _params(), 8)
  stats = epi_jax.mask_stats(state)
  assert int(stats["refreshes"]) == 2  # 4 inner steps, refresh at t = 2 and 4
  assert int(jnp.sum(stats["protected"])) > 0
  chex.assert_tree_all_finite(params)


def test_adam_nu_under_inject_hyperparams():
  inner = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2)
  _, state, _ = _run(epi_jax.epi(inner, p=0.1, interval=1, sensitivity="adam_nu"), _params(), 3)
  nu = optax.tree.get(state, "nu")
  chex.assert_trees_all_equal(epi_jax.sensitivity_of(state), nu)
  assert state.sensitivity == ()


def test_sensitivity_alias_is_deprecated():
  _, state, _ = _run(epi_jax.epi(optax.adamw(1e-2), p=0.1, interval=1), _params(), 2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    current = epi_jax.sensitivity_of(state)
  with pytest.warns(DeprecationWarning, match="sensitivity_of"):
    old = epi_jax.sensitivity(state)
  chex.assert_trees_all_equal(old, current)
  assert float(sum(jnp.sum(x) for x in jax.tree.leaves(current))) > 0


def test_inside_optax_masked():
  params = _params()
  only_layers = {"embed": False, "layers": [{"w": True, "b": True}] * 3}
  tx = optax.masked(epi_jax.epi(optax.adamw(1e-2), p=0.2, interval=1), only_layers)
  new, state, _ = _run(tx, params, 2)
  # optax.masked passes the raw gradient through on leaves outside its mask.
  expected = params["embed"] + _grads(params, 0)["embed"] + _grads(params, 1)["embed"]
  chex.assert_trees_all_close(new["embed"], expected)
  mask = epi_jax.protection_mask(state)
  assert int(sum(jnp.sum(m) for m in jax.tree.leaves(mask))) > 0


def test_bfloat16_params_keep_dtype():
  params, state, _ = _run(
      epi_jax.epi(optax.adamw(1e-2), p=0.1, interval=1, sensitivity_dtype=jnp.bfloat16),
      _params(jnp.bfloat16),
      3,
  )
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(epi_jax.sensitivity_of(state)))


def test_state_is_stable_through_lax_cond():
  tx = epi_jax.epi(optax.adamw(1e-2), p=0.1, interval=2)
  params = _params()
  state = tx.init(params)

  @jax.jit
  def maybe_step(flag, state):
    return jax.lax.cond(
        flag, lambda s: tx.update(_grads(params, 0), s, params)[1], lambda s: s, state
    )

  after = maybe_step(True, maybe_step(True, state))
  chex.assert_trees_all_equal_shapes_and_dtypes(after, state)
  chex.assert_trees_all_equal_structs(after, state)


class _Mlp(nnx.Module):

  def __init__(self, *, rngs):
    self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(3)])
    self.counter = nnx.Variable(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    for layer in self.layers:
      x = jnp.tanh(layer(x))
    return x


def test_nnx_optimizer():
  model = _Mlp(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, epi_jax.epi(optax.adamw(1e-2), p=0.1, interval=2), wrt=nnx.Param)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 4))

  @nnx.jit
  def train_step(model, optimizer, x):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
    optimizer.update(model, grads)

  for _ in range(3):
    train_step(model, optimizer, x)
  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  train_step(model, optimizer, x)  # t = 4: refresh, applied to this step
  stats = epi_jax.mask_stats(optimizer.opt_state)
  assert int(stats["refreshes"]) == 2
  mask = jax.tree.leaves(epi_jax.protection_mask(optimizer.opt_state))
  assert sum(int(jnp.sum(m)) for m in mask) == int(jnp.sum(stats["protected"])) > 0
  assert epi_jax.layer_groups(before).names == ("block/0", "block/1", "block/2")
  after = jax.tree.leaves(nnx.state(model, nnx.Param))
  for m, a, b in zip(mask, after, jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(a)[np.asarray(m)], np.asarray(b)[np.asarray(m)])
    assert np.all(np.asarray(a)[~np.asarray(m)] != np.asarray(b)[~np.asarray(m)])


def test_find_state_in_place_reaches_the_optimizer_variables():
  """``find_state(..., unwrap=False)`` returns the optimizer's own variables (what EWC updates
  in place); the default returns their arrays; anything but one match is refused."""
  from epi_jax._src.epi import EPIState
  from epi_jax._src.state import find_state

  model = _Mlp(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, epi_jax.epi(optax.adamw(1e-2), p=0.1, interval=2), wrt=nnx.Param)
  held = find_state(optimizer.opt_state, (EPIState,), unwrap=False)
  assert isinstance(held.count, nnx.Variable)
  held.count.set_value(jnp.asarray(7, held.count.get_value().dtype))
  values = find_state(optimizer.opt_state, (EPIState,))
  assert not isinstance(values.count, nnx.Variable) and int(values.count) == 7
  with pytest.raises(ValueError, match="expected exactly one EPIState"):
    find_state({"a": values, "b": values}, (EPIState,))


class _LinenBlock(flax.linen.Module):

  @flax.linen.compact
  def __call__(self, x, _):
    init = flax.linen.with_logical_partitioning(
        flax.linen.initializers.normal(0.5), ("embed", "mlp")
    )
    return jnp.tanh(x @ self.param("w", init, (8, 8))), None


class _ScannedLinen(flax.linen.Module):
  """MaxText's layout: 3 blocks stacked by ``nn.scan`` under ``layers``, logically boxed."""

  scan_axis: int

  @flax.linen.compact
  def __call__(self, x):
    scan = flax.linen.scan(
        _LinenBlock,
        variable_axes={"params": self.scan_axis},
        split_rngs={"params": True},
        length=3,
        metadata_params={flax.linen.PARTITION_NAME: "layers"},
    )
    return scan(name="layers")(x, None)[0]


@pytest.mark.parametrize("scan_axis, groups", [(0, 3), (1, 8)])
def test_linen_train_state_with_logical_boxes(scan_axis, groups):
  # MaxText's Linen path: tx.init on boxed parameters, updates on unboxed ones.
  model = _ScannedLinen(scan_axis)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
  tx = epi_jax.epi(optax.adamw(1e-2), p=0.2, interval=1)
  boxed = model.init(jax.random.PRNGKey(0), x)
  state = flax.training.train_state.TrainState.create(apply_fn=model.apply, params=boxed, tx=tx)
  specs = flax.linen.get_partition_spec(state.opt_state.mask)
  assert jax.tree.leaves(specs)[0] == flax.linen.get_partition_spec(boxed)["params"]["layers"]["w"]
  state = flax.linen.meta.unbox(state)
  # The "block" grouping splits a stacked leaf along axis 0: the layer axis only when it is 0.
  assert len(epi_jax.layer_groups(state.params).names) == groups
  grads = jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2))(state.params)
  new = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads)
  (mask,) = jax.tree.leaves(epi_jax.protection_mask(new.opt_state))
  (before,), (after,) = jax.tree.leaves(state.params), jax.tree.leaves(new.params)
  assert int(mask.sum()) == int(0.2 * mask.size)
  np.testing.assert_array_equal(after[mask], before[mask])
  assert np.all(after[~mask] != before[~mask])


def test_integer_and_none_leaves_pass_through():
  params = {"w": jnp.ones((3, 3)), "step": jnp.zeros((), jnp.int32), "skip": None}
  tx = epi_jax.epi(optax.sgd(1.0), p=0.5, interval=1)
  state = tx.init(params)
  grads = {"w": jnp.arange(9.0).reshape(3, 3), "step": jnp.ones((), jnp.int32), "skip": None}
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert int(updates["step"]) == -1
  assert updates["skip"] is None
  assert not bool(epi_jax.protection_mask(state)["step"])
  assert int(jnp.sum(epi_jax.protection_mask(state)["w"])) == 4


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"p": -0.1}, "p"),
        ({"p": 1.0}, "p"),
        ({"p": "0.1"}, "p"),
        ({"beta": 1.0}, "beta"),
        ({"beta": -0.5}, "beta"),
        ({"interval": 0}, "interval"),
        ({"interval": 2.5}, "interval"),
        ({"normalize": "zscore"}, "normalize"),
        ({"budget": "local"}, "budget"),
        ({"layer_of": "module"}, "layer_of"),
        ({"sensitivity": "fisher"}, "sensitivity"),
        ({"sensitivity_dtype": jnp.int8}, "sensitivity_dtype"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=rf"^{name} must"):
    epi_jax.epi(optax.adamw(1e-3), **kwargs)


def test_adam_nu_without_adam_says_so():
  tx = epi_jax.epi(optax.sgd(1e-2, momentum=0.9), sensitivity="adam_nu")
  with pytest.raises(ValueError, match="no 'nu' field"):
    tx.init(_params())


def test_static_isolation_freezes_the_mask():
  params = _params()
  mask = epi_jax.top_p_mask(jax.tree.map(jnp.abs, params), 0.2)
  new, state, _ = _run(
      epi_jax.static_isolation(optax.adamw(1e-2, weight_decay=0.5), mask), params, 3
  )
  chex.assert_trees_all_equal(epi_jax.protection_mask(state), mask)
  for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(new), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a)[np.asarray(m)], np.asarray(b)[np.asarray(m)])
    assert np.all(np.asarray(a)[~np.asarray(m)] != np.asarray(b)[~np.asarray(m)])


def test_static_isolation_rejects_mismatched_mask():
  with pytest.raises(ValueError, match="mask shape differs"):
    epi_jax.static_isolation(optax.adamw(1e-2), {"w": jnp.zeros((2,), bool)}).init(
        {"w": jnp.zeros((3,))}
    )


def test_probe_mask_ranks_update_magnitudes():
  theta_0 = {"layers": [{"w": jnp.zeros((10,))}, {"w": jnp.zeros((10,))}]}
  probe = {"layers": [{"w": jnp.arange(10.0)}, {"w": 100.0 * jnp.arange(10.0)}]}
  raw = epi_jax.probe_mask(probe, theta_0, 0.1, normalize="none")
  normed = epi_jax.probe_mask(probe, theta_0, 0.1)
  assert [int(jnp.sum(m)) for m in jax.tree.leaves(raw)] == [0, 2]
  assert [int(jnp.sum(m)) for m in jax.tree.leaves(normed)] == [1, 1]


def test_bfloat16_sensitivity_is_unbiased():
  """Stochastic rounding keeps the bfloat16 EMA on the float32 one (nearest stalls ~15% low)."""
  params = {"w": jnp.zeros((4096,))}
  grads = {"w": jnp.full((4096,), 1.1)}
  curves = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    tx = epi_jax.epi(optax.sgd(0.0), p=0.0, beta=0.99, sensitivity_dtype=dtype)
    state = tx.init(params)
    step = jax.jit(lambda s: tx.update(grads, s, params)[1])
    for _ in range(400):
      state = step(state)
    curves[dtype] = np.asarray(epi_jax.sensitivity_of(state)["w"], np.float64)
  np.testing.assert_allclose(curves[jnp.float32], 1.21 * (1 - 0.99**400), rtol=1e-4)
  np.testing.assert_allclose(curves[jnp.bfloat16].mean(), curves[jnp.float32][0], rtol=5e-3)


def test_state_from_eager_init_can_be_donated():
  params = _params()
  tx = epi_jax.epi(optax.adamw(1e-2), p=0.1, interval=1)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p), donate_argnums=(1,))
  _, state = step(params, state, _grads(params, 0))
  assert int(epi_jax.mask_stats(state)["refreshes"]) == 1
