"""The decoder of a run: its ModelConfig, a concrete model, or an abstract one for planning."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from epi_jax.models import Decoder, ModelConfig, checkpoint_config, from_pretrained, shard_model
from epi_jax.train.config import ModelSection


def model_config(section: ModelSection, architecture: ModelConfig | None = None) -> ModelConfig:
  """The architecture of ``section`` (or ``architecture``, for shapes no preset names) with the
  section's layer scanning, rematerialization and compute dtype switches."""
  return dataclasses.replace(
      architecture or _architecture(section),
      scan_layers=section.scan_layers,
      remat=section.remat,
      compute_dtype=section.compute_dtype or None,
  )


def _architecture(section: ModelSection) -> ModelConfig:
  """The checkpoint's config, else the preset named by ``section.preset``; the tiny preset takes
  the section's shape fields."""
  if section.checkpoint:
    return checkpoint_config(section.checkpoint)
  if section.preset != "tiny":
    return getattr(ModelConfig, section.preset)()
  return ModelConfig.tiny(
      section.family,
      hidden_size=section.hidden_size,
      intermediate_size=section.intermediate_size,
      num_layers=section.num_layers,
      num_heads=section.num_heads,
      num_kv_heads=max(1, section.num_heads // 2),
      head_dim=section.hidden_size // section.num_heads,
  )


def build_model(section: ModelSection, *, seed: int, mesh=None) -> Decoder:
  """The checkpoint's weights, or a random initialization from ``seed``, placed on ``mesh``."""
  dtype = jnp.dtype(section.dtype)
  if section.checkpoint:
    model, _ = from_pretrained(
        section.checkpoint,
        dtype=dtype,
        mesh=mesh,
        scan_layers=section.scan_layers,
        remat=section.remat,
        compute_dtype=section.compute_dtype or None,
    )
    return model
  model = Decoder(model_config(section), dtype=dtype, rngs=nnx.Rngs(seed))
  return model if mesh is None else shard_model(model, mesh)


def abstract_model(section: ModelSection, architecture: ModelConfig | None = None) -> Decoder:
  """The model (of ``architecture`` where given) with ShapeDtypeStruct parameters: nothing is
  allocated."""
  config = model_config(section, architecture)
  dtype = jnp.dtype(section.dtype)
  return nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(0)))
