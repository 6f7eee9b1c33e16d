"""bfloat16 master weights: ``epi_jax.apply_updates`` (stochastic rounding) and
``epi_jax.float32_state``, against NumPy float64 references."""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import epi_jax


def _tree(dtype, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "w": jnp.asarray(rng.normal(0, 0.05, (64, 48)), dtype),
      "b": jnp.asarray(rng.normal(0, 1.0, (48,)), dtype),
  }


def _neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The bfloat16 values just below and above each float32 x (equal where x is one)."""
  lo = x.astype(ml_dtypes.bfloat16).astype(np.float64)
  down = np.where(lo > x, np.nextafter(lo.astype(ml_dtypes.bfloat16), -np.inf), lo)
  up = np.where(lo < x, np.nextafter(lo.astype(ml_dtypes.bfloat16), np.inf), lo)
  return np.asarray(down, np.float64), np.asarray(up, np.float64)


def test_float32_parameters_match_optax():
  params, updates = _tree(jnp.float32), _tree(jnp.float32, seed=1)
  chex.assert_trees_all_equal(
      epi_jax.apply_updates(params, updates, 7), optax.apply_updates(params, updates)
  )


def test_bfloat16_rounds_to_a_neighbour_and_is_unbiased():
  params = _tree(jnp.bfloat16)
  # Updates far below half an ulp of most entries: round-to-nearest keeps almost all of them.
  updates = jax.tree.map(lambda x: 1e-4 * x.astype(jnp.float32), _tree(jnp.float32, seed=1))
  exact = jax.tree.map(
      lambda p, u: np.asarray(p, np.float64) + np.asarray(u, np.float64), params, updates
  )
  nearest = optax.apply_updates(params, updates)
  assert np.mean(np.asarray(nearest["w"]) == np.asarray(params["w"])) > 0.9
  draws = [epi_jax.apply_updates(params, updates, step) for step in range(400)]
  for name in params:
    x = np.asarray(params[name], np.float32) + np.asarray(updates[name], np.float32)
    down, up = _neighbours(x)
    values = np.stack([np.asarray(d[name], np.float64) for d in draws])
    assert np.all((values == down) | (values == up)), name
    # Each draw is down or up with probability by distance: the mean converges to x.
    width = np.where(up > down, up - down, 1.0)
    bias = (values.mean(0) - exact[name]) / width
    assert abs(bias.mean()) < 0.01 and np.abs(bias).max() < 0.2, name


def test_zero_update_leaves_bfloat16_bits_and_steps_draw_anew():
  params = _tree(jnp.bfloat16)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
  chex.assert_trees_all_equal(epi_jax.apply_updates(params, zeros, 3), params)
  updates = jax.tree.map(lambda x: 1e-3 * jnp.ones(x.shape, jnp.float32), params)
  a, b = (epi_jax.apply_updates(params, updates, s)["w"] for s in (1, 2))
  assert np.mean(np.asarray(a) != np.asarray(b)) > 0.05


@pytest.mark.parametrize("inner", ["adamw", "epi"])
def test_float32_state_runs_inner_in_float32(inner):
  tx = optax.adamw(1e-3, weight_decay=0.01)
  if inner == "epi":
    tx = epi_jax.epi(tx, p=0.1, interval=1)
  wrapped = epi_jax.float32_state(tx)
  params, grads = _tree(jnp.bfloat16), _tree(jnp.float32, seed=2)
  state = wrapped.init(params)
  floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)
  updates, state = wrapped.update(grads, state, params)
  as_f32 = optax.tree_utils.tree_cast(params, jnp.float32)
  want, _ = tx.update(grads, tx.init(as_f32), as_f32)
  chex.assert_trees_all_equal(updates, want)
