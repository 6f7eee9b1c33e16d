"""Presets, config.json conversion and the parameter tree layout."""

import jax
import jax.numpy as jnp
import pytest
import transformers
from flax import nnx

from epi_jax.models import FAMILIES, Decoder, ModelConfig

PRESETS = {  # preset -> parameters (billions, as Hugging Face reports them)
    "llama3_8b": 8.03,
    "llama3_1_8b": 8.03,
    "mistral_7b": 7.24,
    "qwen2_7b": 7.62,
    "gemma2_9b": 9.24,
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_count(preset):
  config = getattr(ModelConfig, preset)()
  abstract = nnx.eval_shape(lambda: Decoder(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert round(count / 1e9, 2) == PRESETS[preset]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_config_json_round_trip_through_transformers(preset):
  config = getattr(ModelConfig, preset)()
  hf = config.to_hf()
  assert ModelConfig.from_hf(hf) == config
  torch_config = transformers.AutoConfig.for_model(**hf)
  assert ModelConfig.from_hf(torch_config.to_dict()) == config


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_preset_runs(family):
  config = ModelConfig.tiny(family)
  assert config.vocab_size >= 256
  model = Decoder(config, rngs=nnx.Rngs(0))
  logits = model(jnp.ones((2, 5), jnp.int32))
  assert logits.shape == (2, 5, config.vocab_size)
  assert logits.dtype == jnp.float32


def test_legacy_rope_fields_are_read():
  hf = ModelConfig.llama3_1_8b().to_hf()
  rope = hf.pop("rope_parameters")
  hf["rope_theta"] = rope.pop("rope_theta")
  hf["rope_scaling"] = rope
  assert ModelConfig.from_hf(hf) == ModelConfig.llama3_1_8b()


def test_parameter_paths_carry_the_block_index_and_logical_axes():
  model = Decoder(ModelConfig.tiny("gemma2"), rngs=nnx.Rngs(0))
  paths = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert "layers/1/attn/q" in paths and "layers/0/post_mlp_norm/scale" in paths
  assert "lm_head" not in paths  # Gemma-2 ties the output head to the embedding
  assert paths["layers/1/attn/q"].get_metadata()["out_sharding"] == ("embed", "q_heads", "head_dim")


def test_invalid_configs_name_the_problem():
  with pytest.raises(ValueError, match="num_kv_heads"):
    ModelConfig.tiny(num_kv_heads=3)
  with pytest.raises(ValueError, match="rope_type='yarn'"):
    ModelConfig.from_hf(
        dict(ModelConfig.tiny().to_hf(), rope_parameters={"rope_type": "yarn", "rope_theta": 1.0})
    )
  with pytest.raises(ValueError, match="family='gpt2'"):
    ModelConfig.tiny("gpt2")
