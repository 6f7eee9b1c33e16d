"""Scanned (stacked) blocks, rematerialization and packed sequences in the decoder."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import epi_jax
from epi_jax.data import Encoded, make_batch
from epi_jax.models import Decoder, ModelConfig
from epi_jax.models.generate import generate
from epi_jax.models.transformer import positions_from_segments
from epi_jax.models.loss import response_loss
from epi_jax.train.step import make_train_step

# Layer windows that differ per layer exercise the per-layer mask choice inside the scan.
CONFIGS = {
    "llama": ModelConfig.tiny("llama", num_layers=3),
    "gemma2": ModelConfig.tiny(
        "gemma2",
        num_layers=3,
        layer_types=("sliding_attention", "full_attention", "sliding_attention"),
    ),
    "qwen2": ModelConfig.tiny("qwen2", num_layers=3),
}


def stacked_copy(model: Decoder, **switches) -> Decoder:
  """A scanned Decoder holding ``model``'s weights, block i at slice i of each stacked leaf."""
  scanned = Decoder(
      dataclasses.replace(model.config, scan_layers=True, **switches), rngs=nnx.Rngs(1)
  )
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  filled = []
  for path, variable in nnx.to_flat_state(nnx.state(scanned, nnx.Param)):
    if path[0] == "layers":
      value = jnp.stack(
          [flat[("layers", i, *path[1:])].get_value() for i in range(model.config.num_layers)]
      )
    else:
      value = flat[path].get_value()
    filled.append((path, variable.replace(value)))
  nnx.update(scanned, nnx.from_flat_state(filled))
  return scanned


def left_padded(seed: int, batch: int = 2, length: int = 14):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 300, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[0, :4] = 0
  return jnp.asarray(ids), jnp.asarray(mask)


def loss_and_grads(model: Decoder, batch):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    total, count = response_loss(nnx.merge(graphdef, params, rest), batch)
    return total / count

  return jax.value_and_grad(loss)(params)


def packed_examples(seed: int, lengths=(5, 9, 4)) -> list[Encoded]:
  rng = np.random.default_rng(seed)
  examples = []
  for n in lengths:
    ids = rng.integers(3, 300, n).astype(np.int32)
    mask = np.zeros(n, bool)
    mask[n // 2 :] = True
    examples.append(Encoded(ids, mask))
  return examples


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_scanned_logits_grads_and_generation_equal_unscanned(name):
  model = Decoder(CONFIGS[name], rngs=nnx.Rngs(0))
  scanned = stacked_copy(model)
  ids, mask = left_padded(seed=1)
  chex.assert_trees_all_close(scanned(ids, mask), model(ids, mask), atol=1e-5, rtol=1e-5)

  batch = make_batch([[e] for e in packed_examples(2)], seq_len=16, pad_id=0)
  loss, grads = loss_and_grads(model, batch)
  scanned_loss, scanned_grads = loss_and_grads(scanned, batch)
  np.testing.assert_allclose(scanned_loss, loss, rtol=1e-6)
  restacked = stacked_copy(_with_params(model, grads))
  chex.assert_trees_all_close(scanned_grads, nnx.state(restacked, nnx.Param), atol=1e-6, rtol=1e-5)

  want = generate(model, ids, mask, max_new_tokens=6)
  np.testing.assert_array_equal(generate(scanned, ids, mask, max_new_tokens=6), want)


def _with_params(model: Decoder, params) -> Decoder:
  clone = nnx.clone(model)
  nnx.update(clone, params)
  return clone


@pytest.mark.parametrize("remat", ["block", "dots"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_keeps_loss_and_gradients(remat, scan):
  model = Decoder(CONFIGS["gemma2"], rngs=nnx.Rngs(3))
  base = stacked_copy(model) if scan else model
  rematted = (
      stacked_copy(model, remat=remat)
      if scan
      else _with_params(
          Decoder(dataclasses.replace(model.config, remat=remat), rngs=nnx.Rngs(4)),
          nnx.state(model, nnx.Param),
      )
  )
  batch = make_batch([[e] for e in packed_examples(4)], seq_len=16, pad_id=0)
  want = loss_and_grads(base, batch)
  got = loss_and_grads(rematted, batch)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-5)


def test_scanned_params_keep_one_epi_group_per_block():
  model = Decoder(CONFIGS["llama"], rngs=nnx.Rngs(0))
  scanned = stacked_copy(model)
  layers = nnx.state(scanned, nnx.Param)["layers"]
  for variable in jax.tree.leaves(layers, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    assert variable.get_metadata()["out_sharding"][0] == "layers"
    assert variable.shape[0] == 3
  flat = epi_jax.layer_groups(nnx.state(model, nnx.Param))
  stacked = epi_jax.layer_groups(nnx.state(scanned, nnx.Param))
  assert sorted(zip(stacked.names, stacked.sizes)) == sorted(zip(flat.names, flat.sizes))
  assert {f"block/{i}" for i in range(3)} <= set(stacked.names)


def test_positions_restart_per_segment():
  segments = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 2, 2, 2, 2, 2, 2, 0]], np.int32)
  want = np.zeros_like(segments)
  for b, row in enumerate(segments):
    for t in range(1, len(row)):
      if row[t] and row[t] == row[t - 1]:
        want[b, t] = want[b, t - 1] + 1
  np.testing.assert_array_equal(positions_from_segments(jnp.asarray(segments)), want)


@pytest.mark.parametrize("name", ["gemma2", "llama"])
@pytest.mark.parametrize("scan", [False, True])
def test_packed_row_gives_each_example_its_own_logits(name, scan):
  model = Decoder(CONFIGS[name], rngs=nnx.Rngs(5))
  model = stacked_copy(model) if scan else model
  examples = packed_examples(6, lengths=(5, 11, 4))
  batch = make_batch([examples], seq_len=24, pad_id=0)
  logits = model(jnp.asarray(batch["input_ids"]), segment_ids=jnp.asarray(batch["segment_ids"]))
  start = 0
  for example in examples:
    alone = model(jnp.asarray(example.input_ids)[None])[0]
    n = len(example.input_ids)
    chex.assert_trees_all_close(logits[0, start : start + n], alone, atol=2e-5, rtol=1e-5)
    start += n


def test_packed_train_step_equals_padded_step():
  """A step on three examples packed into one row equals the step on them padded (SGD, so
  the parameters compare the gradients: Adam's first step would amplify rounding)."""
  model = Decoder(CONFIGS["llama"], rngs=nnx.Rngs(7))
  examples = packed_examples(8, lengths=(6, 9, 7))
  padded = make_batch([[e] for e in examples], seq_len=24, pad_id=0)
  packed = make_batch([examples], seq_len=24, pad_id=0)
  results = []
  for batch in (padded, packed):
    clone = _with_params(model, jax.tree.map(jnp.copy, nnx.state(model)))
    optimizer = nnx.Optimizer(clone, optax.sgd(1.0), wrt=nnx.Param)
    graphdef, state = nnx.split((clone, optimizer))
    state, out = make_train_step(graphdef, 1)(state, {k: jnp.asarray(v) for k, v in batch.items()})
    results.append((out, nnx.state(nnx.merge(graphdef, state)[0], nnx.Param)))
  (out_padded, params_padded), (out_packed, params_packed) = results
  np.testing.assert_allclose(out_packed["loss"], out_padded["loss"], rtol=1e-6)
  assert float(out_packed["tokens"]) == float(out_padded["tokens"])
  chex.assert_trees_all_close(params_packed, params_padded, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_causal_blocks_skip_hidden_keys_only(family, monkeypatch):
  """Long self-attention runs per query block over the keys it can see; real tokens get
  the logits and gradients of attention over all keys (padding rows may differ)."""
  from epi_jax.models import layers

  model = Decoder(CONFIGS[family], rngs=nnx.Rngs(0))
  t = 4 * 16
  rng = np.random.default_rng(3)
  ids = jnp.asarray(rng.integers(3, 300, (2, t)).astype(np.int32))
  segments = np.ones((2, t), np.int32)
  segments[0, 20:] = 2  # a packed row: its second example starts mid block
  segments[1, 50:] = 0  # a padded row
  batch = {
      "input_ids": ids,
      "segment_ids": jnp.asarray(segments),
      "positions": positions_from_segments(jnp.asarray(segments)),
      "loss_mask": jnp.asarray(segments > 0),
  }
  monkeypatch.setattr(layers, "CAUSAL_BLOCK", 16)
  blocked = model(ids, segment_ids=batch["segment_ids"], positions=batch["positions"])
  blocked_grads = loss_and_grads(model, batch)
  monkeypatch.setattr(layers, "CAUSAL_BLOCK", t)  # one block: all keys
  full = model(ids, segment_ids=batch["segment_ids"], positions=batch["positions"])
  real = segments > 0
  np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(full)[real], atol=2e-5)
  chex.assert_trees_all_close(blocked_grads, loss_and_grads(model, batch), atol=2e-5)
