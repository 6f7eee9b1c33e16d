"""The Flax decoder against transformers' PyTorch models on the same tiny random checkpoints."""

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_reference import VARIANTS, WINDOW, left_padded_batch, torch_logits, torch_model

from epi_jax.models import from_pretrained, save_pretrained
from epi_jax.models.generate import generate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
  """(variant, torch model, folder holding its save_pretrained output)."""
  model = torch_model(request.param)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  return request.param, model, path


@pytest.fixture(scope="module")
def flax_model(checkpoint):
  return from_pretrained(checkpoint[2])


def _real(mask):
  return mask.astype(bool)


def test_logits_match_torch_with_left_padding(checkpoint, flax_model):
  _, torch_ref, _ = checkpoint
  model, _ = flax_model
  ids, mask = left_padded_batch(seed=0)
  assert ids.shape[1] > 2 * WINDOW
  want = torch_logits(torch_ref, ids, mask)
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  chex.assert_shape(got, want.shape)
  np.testing.assert_allclose(got[_real(mask)], want[_real(mask)], atol=1e-4, rtol=0)


def test_greedy_generation_matches_torch(checkpoint, flax_model):
  _, torch_ref, _ = checkpoint
  model, _ = flax_model
  ids, mask = left_padded_batch(seed=1, length=9, pads=(0, 3, 6))
  eos = 7  # a frequent-enough id to exercise early stopping on some rows
  want = torch_ref.generate(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      do_sample=False,
      max_new_tokens=14,
      eos_token_id=eos,
      pad_token_id=0,
  )[:, ids.shape[1] :].numpy()
  got = np.asarray(generate(model, ids, mask, max_new_tokens=14, eos_token_id=eos, pad_token_id=0))
  np.testing.assert_array_equal(got[:, : want.shape[1]], want)
  assert (got[:, want.shape[1] :] == 0).all()


def test_round_trip_through_torch(checkpoint, flax_model, tmp_path):
  variant, torch_ref, _ = checkpoint
  model, config = flax_model
  save_pretrained(model, config, tmp_path, max_shard_bytes=60_000)  # forces several shards
  assert (tmp_path / "model.safetensors.index.json").exists()
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager"
  ).eval()
  assert type(reloaded) is type(torch_ref), variant
  ids, mask = left_padded_batch(seed=2)
  np.testing.assert_allclose(
      torch_logits(reloaded, ids, mask)[_real(mask)],
      torch_logits(torch_ref, ids, mask)[_real(mask)],
      atol=1e-6,
      rtol=0,
  )
  again, again_config = from_pretrained(tmp_path)
  assert again_config == config
  np.testing.assert_array_equal(np.asarray(again(ids, mask)), np.asarray(model(ids, mask)))


def test_bfloat16_is_close_to_float32(checkpoint, flax_model):
  model, _ = flax_model
  half, _ = from_pretrained(checkpoint[2], dtype=jnp.bfloat16)
  assert half.layers[0].attn.q.dtype == jnp.bfloat16
  ids, mask = left_padded_batch(seed=3)
  full = np.asarray(model(ids, mask))[_real(mask)]
  approx = np.asarray(half(ids, mask))[_real(mask)]
  chex.assert_tree_all_finite(approx)
  assert np.abs(approx - full).max() < 0.1 * np.abs(full).max()


def _dot_operand_dtypes(jaxpr) -> set:
  """The dtypes of every dot_general's operands in ``jaxpr`` and the jaxprs nested in it."""
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found |= {v.aval.dtype for v in eqn.invars}
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found |= _dot_operand_dtypes(sub)
  return found


def test_bfloat16_compute_with_float32_master_weights(checkpoint, flax_model):
  model, _ = flax_model
  mixed, config = from_pretrained(checkpoint[2], compute_dtype="bfloat16")
  assert config.compute_dtype == "bfloat16" and mixed.layers[0].attn.q.dtype == jnp.float32
  ids, mask = left_padded_batch(seed=3)
  graphdef, state = nnx.split(mixed)
  jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids, mask))(state).jaxpr
  assert _dot_operand_dtypes(jaxpr) == {jnp.dtype(jnp.bfloat16)}  # every matmul in bfloat16
  logits = mixed(ids, mask)
  assert logits.dtype == jnp.float32
  full = np.asarray(model(ids, mask))[_real(mask)]
  approx = np.asarray(logits)[_real(mask)]
  assert 0 < np.abs(approx - full).max() < 0.1 * np.abs(full).max()
