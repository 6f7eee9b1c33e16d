"""Checkpoint folder handling: one error for every bad tensor, tokenizer files, model-only saving."""

import json

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from epi_jax.models import (
    CheckpointError,
    CheckpointMismatchError,
    Decoder,
    ModelConfig,
    from_pretrained,
    load_tokenizer,
    save_pretrained,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A tiny random qwen2 (biases included) saved as one safetensors file."""
  config = ModelConfig.tiny("qwen2")
  path = tmp_path_factory.mktemp("qwen2")
  save_pretrained(Decoder(config, rngs=nnx.Rngs(0)), config, path)
  return path, config


def test_one_error_names_every_missing_unexpected_and_misshaped_tensor(saved, tmp_path):
  path, config = saved
  tensors = load_file(path / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  tensors["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
  tensors["model.layers.0.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # ignored buffer
  save_file(tensors, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
  with pytest.raises(CheckpointMismatchError) as info:
    from_pretrained(tmp_path)
  error = info.value
  assert isinstance(error, ValueError)
  assert error.missing == ["model.layers.1.mlp.up_proj.weight"]
  assert error.unexpected == ["model.layers.0.self_attn.extra.weight"]
  assert error.mismatched == [
      "model.layers.0.self_attn.k_proj.weight: shape (16, 64), expected (32, 64)"
  ]
  for name in (
      "up_proj",
      "extra.weight",
      "k_proj",
      "missing (1)",
      "unexpected (1)",
      "wrong shape (1)",
  ):
    assert name in str(error)


def test_unsupported_family_is_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
    from_pretrained(tmp_path)


def test_folder_without_weights_is_refused(saved, tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(saved[1].to_hf()))
  with pytest.raises(CheckpointError, match="no .*safetensors files"):
    from_pretrained(tmp_path)


def test_tokenizer_is_loaded_when_present(saved, tmp_path):
  path, config = saved
  assert load_tokenizer(path) is None
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
  model, _ = from_pretrained(path)
  save_pretrained(model, config, tmp_path, tokenizer=tokenizer)
  loaded = load_tokenizer(tmp_path)
  # transformers picks the family's tokenizer class; the vocabulary and special ids carry over.
  assert loaded.convert_tokens_to_ids(["hello", "world"]) == [3, 4]
  assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 2)
  assert not (tmp_path / "model.safetensors.index.json").exists()


def test_scanned_load_and_save_round_trip_the_folder(saved, tmp_path):
  path, config = saved
  plain, _ = from_pretrained(path)
  scanned, scanned_config = from_pretrained(path, scan_layers=True)
  assert (
      scanned_config.scan_layers
      and nnx.state(scanned, nnx.Param)["layers"]["attn"]["q_bias"].shape[0] == config.num_layers
  )
  ids = np.arange(3, 27, dtype=np.int32).reshape(2, 12)
  np.testing.assert_allclose(scanned(ids), plain(ids), atol=1e-5, rtol=1e-5)
  save_pretrained(scanned, scanned_config, tmp_path)
  again = load_file(tmp_path / "model.safetensors")
  tensors = load_file(path / "model.safetensors")
  assert again.keys() == tensors.keys()
  for name in tensors:
    np.testing.assert_array_equal(again[name], tensors[name], err_msg=name)
