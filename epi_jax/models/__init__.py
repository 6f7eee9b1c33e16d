"""Flax NNX decoders of the llama, mistral, qwen2 and gemma2 families, read from and written to
Hugging Face checkpoint folders."""

from epi_jax.models.checkpoint import (
    CheckpointMismatchError,
    from_pretrained,
    load_tokenizer,
    save_pretrained,
)
from epi_jax.models.config import FAMILIES, Llama3RopeScaling, ModelConfig
from epi_jax.models.sharding import RULES, make_mesh, shard_model
from epi_jax.models.transformer import Decoder, KVCache

__all__ = [
    "FAMILIES",
    "RULES",
    "CheckpointMismatchError",
    "Decoder",
    "KVCache",
    "Llama3RopeScaling",
    "ModelConfig",
    "from_pretrained",
    "load_tokenizer",
    "make_mesh",
    "save_pretrained",
    "shard_model",
]
