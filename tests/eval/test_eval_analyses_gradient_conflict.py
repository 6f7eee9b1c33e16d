"""Task Gradient Conflict against a NumPy float64 reference, and the per-task gradients of a
tiny decoder on fixed held-out batches."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import epi_jax.data as data
from epi_jax.eval.gradient_conflict import gradient_conflict, task_gradient_conflict
from epi_jax.eval.heldout import batch_gradients, heldout_batch
from epi_jax.models import Decoder, ModelConfig
from epi_jax.models.loss import response_loss


def reference_tgc(grads):
  vec = {
      t: np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(g)])
      for t, g in grads.items()
  }
  out = {}
  for a, b in itertools.combinations(vec, 2):
    cos = vec[a] @ vec[b] / np.linalg.norm(vec[a]) / np.linalg.norm(vec[b])
    out[f"{a}/{b}"] = max(0.0, -cos)
  return out


def random_tree(rng, scale=1.0):
  return {
      "w": rng.normal(size=(7, 5)) * scale,
      "b": {"x": rng.normal(size=(5,)) * scale},
      "layers": [rng.normal(size=(3, 4, 2)) * scale],
  }


@pytest.mark.parametrize("seed", range(3))
def test_pairs_and_average_match_float64(seed):
  rng = np.random.default_rng(seed)
  base = random_tree(rng)
  grads = {
      "t0": base,
      "t1": random_tree(rng),
      # Planted conflicts: nearly opposite and exactly opposite to t0.
      "t2": jax.tree.map(lambda x, n: -x + 0.3 * n, base, random_tree(rng)),
      "t3": jax.tree.map(lambda x: -2.0 * x, base),
  }
  grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)
  out = gradient_conflict(grads)
  ref = reference_tgc(grads)
  assert list(out["pairs"]) == list(ref)
  for key, value in ref.items():
    assert out["pairs"][key] == pytest.approx(value, abs=1e-6), key
  assert out["pairs"]["t0/t3"] == pytest.approx(1.0, abs=1e-6) and out["pairs"]["t0/t2"] > 0.8
  assert out["average"] == pytest.approx(np.mean(list(ref.values())), abs=1e-6)


def test_zero_gradient_pairs_are_undefined():
  rng = np.random.default_rng(0)
  g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), random_tree(rng))
  out = gradient_conflict(
      {"a": g, "zero": jax.tree.map(jnp.zeros_like, g), "b": jax.tree.map(lambda x: -x, g)}
  )
  assert out["pairs"]["a/zero"] is None and out["pairs"]["zero/b"] is None
  assert out["pairs"]["a/b"] == pytest.approx(1.0) and out["average"] == pytest.approx(1.0)


def synthetic_heldout(tasks, rows):
  encoder = data.ByteTokenizer()
  chats = {t: data.task_splits(t, seed=0, n_train=1, n_eval=5)[1] for t in tasks}
  return {t: heldout_batch(encoder, chats, [t], rows=rows, seq_len=96) for t in tasks}


def test_heldout_batch_takes_tasks_in_turn_and_pads():
  encoder = data.ByteTokenizer()
  chats = {
      t: data.task_splits(t, seed=0, n_train=1, n_eval=3)[1] for t in ("arithmetic", "rewrite")
  }
  batch = heldout_batch(encoder, chats, ["arithmetic", "rewrite"], rows=8, seq_len=64)
  order = [
      chats["arithmetic"][0],
      chats["rewrite"][0],
      chats["arithmetic"][1],
      chats["rewrite"][1],
      chats["arithmetic"][2],
      chats["rewrite"][2],
  ]
  for row, chat in enumerate(order):
    ids = encoder.encode_chat(chat)[0][:64]
    np.testing.assert_array_equal(batch["input_ids"][row, : len(ids)], ids)
  assert batch["input_ids"].shape == (8, 64) and not batch["loss_mask"][6:].any()


def test_task_gradients_of_a_tiny_decoder():
  model = Decoder(ModelConfig.tiny("llama", num_layers=1), rngs=nnx.Rngs(0))
  tasks = ["arithmetic", "rewrite", "logic_choice"]
  batches = {
      t: {k: jnp.asarray(v) for k, v in b.items()}
      for t, b in synthetic_heldout(tasks, rows=8).items()
  }
  # Four micro-batches give the gradient of one pass over the batch.
  for batch in batches.values():

    def mean(params, batch=batch):
      model_def, _, rest = nnx.split(model, nnx.Param, ...)
      total, count = response_loss(nnx.merge(model_def, params, rest), batch)
      return total / count

    direct = jax.grad(mean)(nnx.state(model, nnx.Param))
    chex.assert_trees_all_close(batch_gradients(model, batch, 4), direct, atol=1e-6, rtol=1e-4)
  grads = {t: batch_gradients(model, b, 1) for t, b in batches.items()}
  out = task_gradient_conflict(model, batches, num_micro=2)
  for key, value in reference_tgc(grads).items():
    assert out["pairs"][key] == pytest.approx(value, abs=1e-4), key
