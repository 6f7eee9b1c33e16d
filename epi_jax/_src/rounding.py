"""Stochastic rounding of float32 to bfloat16, for a bfloat16 EMA that does not stall."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def round_bfloat16_stochastic(x: jax.Array, seed: jax.Array) -> jax.Array:
  """Rounds float32 to bfloat16 up or down with probability by distance.

  Round-to-nearest loses every EMA increment below half a bfloat16 ulp (0.4%), so
  with beta=0.99 a bfloat16 S would stall; stochastic rounding keeps it unbiased.
  The random bits are a cheap integer hash of (seed, flat index): no RNG state.
  """
  h = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape) * np.uint32(0x9E3779B1)
  h = h + seed.astype(jnp.uint32) * np.uint32(0x85EBCA77)
  for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B)):
    h = (h ^ (h >> shift)) * np.uint32(mul)
  h = h ^ (h >> 16)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  up = jax.lax.bitcast_convert_type((bits + (h & 0xFFFF)) & np.uint32(0xFFFF0000), jnp.float32)
  return jnp.where(jnp.isfinite(up), up, x).astype(jnp.bfloat16)
