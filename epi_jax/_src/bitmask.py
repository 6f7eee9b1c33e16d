"""Protection masks stored in 1 bit per entry, and applied to updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pack(mask: jax.Array) -> jax.Array:
  """A bool mask stored in 1 bit per entry: bits packed along the last axis.

  Leaves whose last axis is not a multiple of 8 (rare in LLMs) stay bool, so the
  packed array alone determines the mask's shape and shards like its parameter.
  """
  if mask.ndim and mask.shape[-1] % 8 == 0:
    return jnp.packbits(mask, axis=-1)
  return mask


def unpack(packed: jax.Array) -> jax.Array:
  """Inverse of ``pack``."""
  if packed.dtype == jnp.bool_:
    return packed
  return jnp.unpackbits(packed, axis=-1).astype(jnp.bool_)


def zero_protected(packed: jax.Array, update: jax.Array) -> jax.Array:
  """``update`` with the entries its packed mask protects set to zero."""
  return jnp.where(unpack(packed), jnp.zeros_like(update), update)
