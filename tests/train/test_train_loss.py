"""The response-token loss against a NumPy float64 cross-entropy, whole and in logit chunks."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import epi_jax.data as data
from epi_jax.models import Decoder, ModelConfig
from epi_jax.eval import generation
from epi_jax.models import loss as loss_module
from epi_jax.train import step as step_module


@pytest.fixture(scope="module")
def model_and_batch():
  model = Decoder(ModelConfig.tiny("llama"), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(3):
    row = []
    for n in rng.integers(5, 14, size=2):
      ids = rng.integers(3, 320, n).astype(np.int32)
      row.append(data.Encoded(ids, rng.random(n) < 0.6))
    rows.append(row)
  batch = data.make_batch(rows, seq_len=32, pad_id=0)
  return model, {k: jnp.asarray(v) for k, v in batch.items()}


def _reference(model, batch):
  logits = np.asarray(
      model(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"]),
      np.float64,
  )[:, :-1]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  targets = np.asarray(batch["input_ids"])[:, 1:]
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  weight = np.asarray(batch["loss_mask"], np.float64)[:, 1:]
  return (ce * weight).sum(), weight.sum()


@pytest.mark.parametrize("chunk_tokens", [None, 7, 31])
def test_response_loss_matches_float64(model_and_batch, monkeypatch, chunk_tokens):
  model, batch = model_and_batch
  if chunk_tokens:  # 3 x 31 tokens in chunks that do not divide them
    monkeypatch.setattr(loss_module, "LOGIT_CHUNK_BYTES", chunk_tokens * 4 * 320)
  total, count = loss_module.response_loss(model, batch)
  want_total, want_count = _reference(model, batch)
  assert float(count) == want_count > 0
  np.testing.assert_allclose(float(total), want_total, rtol=1e-5)


def test_chunked_gradients_equal_whole(model_and_batch, monkeypatch):
  model, batch = model_and_batch
  whole, _, _ = loss_module.mean_loss_and_grads(model, batch, 1)
  monkeypatch.setattr(loss_module, "LOGIT_CHUNK_BYTES", 7 * 4 * 320)
  chunked, _, _ = loss_module.mean_loss_and_grads(model, batch, 1)
  chex.assert_trees_all_close(chunked, whole, atol=1e-6, rtol=1e-5)


def test_train_step_still_exports_the_loss_helpers():
  for name in ("BATCH_KEYS", "response_loss", "micro_batches", "mean_loss_and_grads"):
    assert getattr(step_module, name) is getattr(loss_module, name)


def test_prefill_last_only_equals_the_last_logits(model_and_batch):
  model, batch = model_and_batch
  ids = batch["input_ids"]
  mask = jnp.ones(ids.shape, bool)
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  full, _ = model.decode(ids, mask, positions, model.init_cache(ids.shape[0], 40))
  last, _ = model.decode(ids, mask, positions, model.init_cache(ids.shape[0], 40), last_only=True)
  assert last.shape == (ids.shape[0], 1, 320)
  np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1:]), atol=1e-5)


def test_row_loglikelihoods_in_chunks_equal_whole(model_and_batch, monkeypatch):
  model, _ = model_and_batch
  rng = np.random.default_rng(4)
  rows = [
      (rng.integers(3, 320, n).astype(np.int32), rng.random(n) < 0.5)
      for n in rng.integers(6, 30, size=5)
  ]
  whole = generation.row_loglikelihoods(model, rows, pad_id=0, batch_size=4)
  monkeypatch.setattr(loss_module, "LOGIT_CHUNK_BYTES", 5 * 4 * 320)
  generation._row_loglikelihoods.clear_cache()  # chunking is fixed when a program is traced
  chunked = generation.row_loglikelihoods(model, rows, pad_id=0, batch_size=4)
  assert np.all(whole < 0)
  np.testing.assert_allclose(chunked, whole, rtol=1e-5)
