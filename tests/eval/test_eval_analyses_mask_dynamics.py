"""Flip rates of EPI's refreshes and the task-conditioned overlap against NumPy float64."""

import itertools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import epi_jax
import epi_jax.data as data
from epi_jax.eval.heldout import batch_gradients
from epi_jax.eval.mask_drift import flip_rates, refresh_flip_rates
from epi_jax.eval.task_overlap import pairwise_jaccard, task_importance, task_overlap
from epi_jax.models import Decoder, ModelConfig

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from reference_epi import entry_groups, jaccard, select_tree  # noqa: E402


def test_flip_rates_of_real_refreshes_match_the_masks():
  rng = np.random.default_rng(0)
  params = {
      "embed": jnp.ones((10, 4)),
      "layers": [{"w": jnp.ones((6, 5))}, {"w": jnp.ones((6, 5))}],
  }
  groups = epi_jax.layer_groups(params)
  gid = entry_groups([x.shape for x in jax.tree.leaves(params)], groups.leaf_ids)
  tx = epi_jax.epi(optax.sgd(0.1), p=0.2, beta=0.5, interval=1)
  state = tx.init(params)
  history, masks = [], []
  for step in range(1, 7):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.lognormal(size=x.shape), jnp.float32), params)
    _, state = tx.update(grads, state, params)
    history.append(
        {k: np.asarray(v).tolist() for k, v in epi_jax.mask_stats(state).items()} | {"step": step}
    )
    masks.append(
        np.concatenate(
            [np.asarray(m).ravel() for m in jax.tree.leaves(epi_jax.protection_mask(state))]
        )
    )
  flips = np.zeros(len(groups.names))
  union = np.zeros(len(groups.names))
  for r in range(1, len(masks)):
    for g in range(len(groups.names)):
      a, b = masks[r][gid == g], masks[r - 1][gid == g]
      expected = np.sum(a ^ b) / np.sum(a | b) if np.sum(a | b) else 0.0
      assert refresh_flip_rates(history[r])[g] == pytest.approx(expected, abs=1e-12)
      flips[g] += np.sum(a ^ b)
      union[g] += np.sum(a | b)
  out = flip_rates(history, groups.names)
  assert out["refreshes"] == 5 and sum(union) > 0 and sum(flips) > 0
  for g, name in enumerate(groups.names):
    assert out["per_group"][name] == pytest.approx(flips[g] / union[g] if union[g] else None)
  assert out["all"] == pytest.approx(flips.sum() / union.sum())


def test_flip_rate_of_a_group_never_protected_is_undefined():
  record = {"locked": [3, 0], "freed": [1, 0], "protected": [5, 0]}
  assert refresh_flip_rates(record) == [4 / 6, 0.0]
  out = flip_rates([record, record], ["block/0", "embed"])
  assert out["per_group"] == {"block/0": pytest.approx(4 / 6), "embed": None}


@pytest.mark.parametrize("seed", range(3))
def test_pairwise_jaccard_matches_float64(seed):
  rng = np.random.default_rng(seed)
  masks = {
      t: {"a": rng.random((9, 4)) < q, "b": [rng.random((5,)) < q]}
      for t, q in (("x", 0.3), ("y", 0.5), ("z", 0.1), ("w", 0.6))
  }
  out = pairwise_jaccard({t: jax.tree.map(jnp.asarray, m) for t, m in masks.items()})
  flat = {t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(m)]) for t, m in masks.items()}
  for a, b in itertools.combinations(flat, 2):
    assert out["pairs"][f"{a}/{b}"] == pytest.approx(jaccard(flat[a], flat[b]), abs=1e-12)
  assert out["average"] == pytest.approx(np.mean(list(out["pairs"].values())))
  empty = pairwise_jaccard({"e": {"a": jnp.zeros(3, bool)}, "f": {"a": jnp.zeros(3, bool)}})
  assert empty == {"pairs": {"e/f": None}, "average": None}


def task_batches(tasks, n):
  encoder = data.ByteTokenizer()
  out = {}
  for t in tasks:
    train, _ = data.task_splits(t, seed=1, n_train=8 * n, n_eval=1)
    it = data.BatchIterator(
        data.encode_chats(train, encoder), batch_size=8, seq_len=96, pad_id=encoder.pad_id, seed=0
    )
    out[t] = [{k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(n)]
  return out


def test_task_importance_and_overlap_of_a_tiny_decoder():
  model = Decoder(ModelConfig.tiny("llama", num_layers=2), rngs=nnx.Rngs(3))
  batches = task_batches(["arithmetic", "rewrite", "string_code"], n=3)
  beta = 0.9
  importance = {t: task_importance(model, bs, beta=beta, num_micro=2) for t, bs in batches.items()}
  for t, bs in batches.items():
    expected = [np.zeros(x.shape) for x in jax.tree.leaves(importance[t])]
    for b in bs:
      g = [np.asarray(x, np.float64) for x in jax.tree.leaves(batch_gradients(model, b, 2))]
      expected = [beta * s + (1 - beta) * x * x for s, x in zip(expected, g)]
    for got, want in zip(jax.tree.leaves(importance[t]), expected):
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-12)

  params = nnx.state(model, nnx.Param)
  groups = epi_jax.layer_groups(params)
  for normalize, budget in (("layer_minmax", "global"), ("none", "per_layer")):
    out = task_overlap(
        model,
        batches,
        p=0.05,
        beta=beta,
        normalize=normalize,
        budget=budget,
        layer_of="block",
        num_micro=2,
    )
    masks = {
        t: np.concatenate(
            [
                m.ravel()
                for m in select_tree(
                    [np.asarray(x, np.float64) for x in jax.tree.leaves(s)],
                    groups.leaf_ids,
                    len(groups.names),
                    0.05,
                    normalize=normalize,
                    budget=budget,
                )[0]
            ]
        )
        for t, s in importance.items()
    }
    for a, b in itertools.combinations(masks, 2):
      assert out["pairs"][f"{a}/{b}"] == pytest.approx(jaccard(masks[a], masks[b]), abs=1e-12)
    assert 0 < out["average"] < 1
