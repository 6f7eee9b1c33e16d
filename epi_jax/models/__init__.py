"""Flax NNX decoders of the llama, mistral, qwen2 and gemma2 families, read from Hugging Face
checkpoint folders or llama.cpp GGUF files and written to either."""

from epi_jax.models.checkpoint import (
    CheckpointMismatchError,
    check_checkpoint,
    checkpoint_config,
    from_pretrained,
    load_tokenizer,
    save_pretrained,
)
from epi_jax.models.config import FAMILIES, CheckpointError, Llama3RopeScaling, ModelConfig
from epi_jax.models.gguf_writer import GGUFExportError, save_gguf
from epi_jax.models.registry import ALIASES, resolve_checkpoint
from epi_jax.models.sharding import RULES, make_mesh, shard_model
from epi_jax.models.transformer import Decoder, KVCache

__all__ = [
    "ALIASES",
    "FAMILIES",
    "RULES",
    "CheckpointError",
    "CheckpointMismatchError",
    "GGUFExportError",
    "Decoder",
    "KVCache",
    "Llama3RopeScaling",
    "ModelConfig",
    "check_checkpoint",
    "checkpoint_config",
    "from_pretrained",
    "load_tokenizer",
    "make_mesh",
    "resolve_checkpoint",
    "save_gguf",
    "save_pretrained",
    "shard_model",
]
