"""Importance vs perturbation: stratified sampling, the vectorized loss changes, and the
correlations, on a quadratic of planted curvature and on a tiny decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import epi_jax
import epi_jax.data as data
from epi_jax.eval.heldout import heldout_batch, mean_loss
from epi_jax.eval.perturbation import (
    importance_vs_perturbation,
    pearson,
    perturbation_deltas,
    sample_entries,
    spearman,
    values_at,
)
from epi_jax.models import Decoder, ModelConfig


def tree(rng):
  """Two unstacked blocks, a stacked (scanned) leaf of 3 blocks, an embedding, an int leaf."""
  return {
      "embed": jnp.asarray(rng.normal(size=(40, 6)), jnp.float32),
      "h": [
          {"w": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)},
          {"w": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)},
      ],
      "layers": {"mlp": jnp.asarray(rng.normal(size=(3, 4, 7)), jnp.float32)},
      "step": jnp.zeros((), jnp.int32),
  }


def quadratic(params, aux):
  """sum_j h_j (theta_j - c_j)^2 / 2 + a_j theta_j over the float leaves."""
  h, c, a = aux
  keys = ("embed", "h", "layers")
  return sum(
      jnp.sum(hh * (x - cc) ** 2 / 2 + aa * x)
      for k in keys
      for x, hh, cc, aa in zip(
          jax.tree.leaves(params[k]),
          jax.tree.leaves(h[k]),
          jax.tree.leaves(c[k]),
          jax.tree.leaves(a[k]),
      )
  )


def planted(rng, params):
  floats = {k: params[k] for k in ("embed", "h", "layers")}
  h = jax.tree.map(lambda x: jnp.asarray(rng.lognormal(0.0, 1.5, x.shape), jnp.float32), floats)
  c = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), floats)
  a = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), floats)
  return h, c, a


def test_sampling_is_stratified_distinct_and_inside_each_group():
  params = tree(np.random.default_rng(0))
  groups = epi_jax.layer_groups(params)
  entries = sample_entries(params, 12, seed=0)
  counts = np.bincount(entries.group, minlength=len(groups.names))
  np.testing.assert_array_equal(counts, [min(12, s) for s in groups.sizes])
  leaves = jax.tree.leaves(params)
  seen = set()
  for leaf, index, group in zip(entries.leaf, entries.index, entries.group):
    ids = groups.leaf_ids[leaf]
    assert ids is not None
    assert (ids if isinstance(ids, int) else ids[index[0]]) == group
    pos = tuple(index[: leaves[leaf].ndim])
    assert all(0 <= i < n for i, n in zip(pos, leaves[leaf].shape))
    seen.add((leaf, pos))
  assert len(seen) == len(entries.leaf)
  values = values_at(params, entries)
  expected = [
      np.asarray(leaves[j])[tuple(i[: leaves[j].ndim])] for j, i in zip(entries.leaf, entries.index)
  ]
  np.testing.assert_array_equal(values, expected)
  np.testing.assert_array_equal(sample_entries(params, 12, seed=0).index, entries.index)
  with pytest.raises(ValueError, match="per_group"):
    sample_entries(params, 0, seed=0)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_deltas_of_a_quadratic_equal_half_curvature_times_eps_squared(chunk):
  rng = np.random.default_rng(1)
  params = tree(rng)
  aux = planted(rng, params)
  entries = sample_entries(params, 5, seed=3)
  got = perturbation_deltas(
      quadratic, params, aux, entries, sigma=0.3, draws=3, seed=4, chunk=chunk
  )
  eps = np.random.default_rng(4).normal(0.0, 0.3, (len(entries.leaf), 3))
  h = values_at(
      {
          "embed": aux[0]["embed"],
          "h": aux[0]["h"],
          "layers": aux[0]["layers"],
          "step": params["step"],
      },
      entries,
  )
  # (L(x + e) + L(x - e)) / 2 - L(x) = h e^2 / 2 exactly; float32 losses of size ~100.
  np.testing.assert_allclose(got, h * np.mean(eps**2, axis=1) / 2, rtol=1e-2, atol=2e-4)


def test_a_planted_relation_is_recovered_and_an_absent_one_is_not():
  rng = np.random.default_rng(2)
  params = tree(rng)
  aux = planted(rng, params)
  h = {
      "embed": aux[0]["embed"],
      "h": aux[0]["h"],
      "layers": aux[0]["layers"],
      "step": params["step"],
  }
  kwargs = dict(per_group=24, draws=16, sigma_rel=0.3, seed=5, layer_of="block", chunk=32)
  found = importance_vs_perturbation(quadratic, params, aux, h, **kwargs)
  assert found["spearman"] > 0.9 and found["pearson"] > 0.9
  assert found["n"] == sum(min(24, n) for n in epi_jax.layer_groups(params).sizes)
  assert found["sigma"] == pytest.approx(
      0.3
      * np.sqrt(
          np.mean(
              np.concatenate(
                  [
                      np.ravel(x)
                      for x in jax.tree.leaves({k: params[k] for k in ("embed", "h", "layers")})
                  ]
              )
              ** 2
          )
      ),
      rel=1e-5,
  )
  unrelated = jax.tree.map(lambda x: jnp.asarray(rng.permutation(np.ravel(x)).reshape(x.shape)), h)
  lost = importance_vs_perturbation(quadratic, params, aux, unrelated, **kwargs)
  assert abs(lost["spearman"]) < 0.3


def naive_ranks(x):
  return np.array([np.sum(x < v) + (np.sum(x == v) + 1) / 2 for v in x])


@pytest.mark.parametrize("seed", range(3))
def test_pearson_and_spearman_match_float64(seed):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 6, 50).astype(float)  # ties
  y = x + rng.normal(size=50)
  assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
  assert spearman(x, y) == pytest.approx(
      np.corrcoef(naive_ranks(x), naive_ranks(y))[0, 1], abs=1e-12
  )
  assert pearson(np.ones(5), y[:5]) is None


def test_vectorized_decoder_losses_equal_one_at_a_time():
  model = Decoder(ModelConfig.tiny("llama", num_layers=1), rngs=nnx.Rngs(0))
  encoder = data.ByteTokenizer()
  chats = {"arithmetic": data.task_splits("arithmetic", seed=0, n_train=1, n_eval=4)[1]}
  batch = {
      k: jnp.asarray(v)
      for k, v in heldout_batch(encoder, chats, ["arithmetic"], rows=4, seq_len=64).items()
  }
  model_def, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p, aux):
    return mean_loss(nnx.merge(model_def, p, aux[0]), aux[1], 2)

  entries = sample_entries(params, 2, seed=0)
  got = perturbation_deltas(
      loss_fn, params, (rest, batch), entries, sigma=0.05, draws=1, seed=1, chunk=4
  )
  eps = np.random.default_rng(1).normal(0.0, 0.05, (len(entries.leaf), 1))[:, 0]
  leaves, treedef = jax.tree.flatten(params)
  base = float(jax.jit(loss_fn)(params, (rest, batch)))
  for n, (leaf, index) in enumerate(zip(entries.leaf, entries.index)):
    moved = []
    for sign in (1, -1):
      changed = list(leaves)
      pos = tuple(index[: leaves[leaf].ndim])
      changed[leaf] = leaves[leaf].at[pos].add(sign * np.float32(eps[n]))
      moved.append(float(jax.jit(loss_fn)(jax.tree.unflatten(treedef, changed), (rest, batch))))
    assert got[n] == pytest.approx(np.mean(moved) - base, abs=2e-6), n
