"""Stochastic rounding of float32 to bfloat16: a bfloat16 EMA that does not stall, bfloat16
master weights whose small updates are not dropped."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


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


def float32_state(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner`` with its state and updates in float32 whatever the parameters' dtype.

  For bfloat16 master weights: a bfloat16 Adam second moment cannot decay (0.999 rounds to 1.0
  in bfloat16, so nu only grows), and a bfloat16 update loses its low bits before it is applied.
  The wrapper casts the parameters (and the gradients) to float32 before ``inner`` sees them;
  ``apply_updates`` then adds the float32 updates with stochastic rounding.
  """
  to_f32 = lambda tree: optax.tree_utils.tree_cast(tree, jnp.float32)

  def init_fn(params):
    return inner.init(to_f32(params))

  def update_fn(updates, state, params=None):
    return inner.update(to_f32(updates), state, None if params is None else to_f32(params))

  return optax.GradientTransformation(init_fn, update_fn)


def apply_updates(params: optax.Params, updates: optax.Updates, step: jax.Array) -> optax.Params:
  """``params + updates`` leaf by leaf, as ``optax.apply_updates``, except that a bfloat16
  parameter gets the float32 sum rounded stochastically (``round_bfloat16_stochastic``).

  Round-to-nearest drops every update below half a bfloat16 ulp: at lr 1e-5 almost all of
  them (Gupta et al. 2015, arXiv 1502.02551; Zamirai et al. 2020, arXiv 2010.06192). Rounded
  up or down with probability by distance, the expected new parameter is the float32 one. An
  update of exactly 0 (a protected entry) leaves the parameter bit-identical. ``step`` (the
  optimizer's counter) and the leaf's index seed the rounding, salted apart from the seeds of
  EPI's bfloat16 sensitivity.
  """
  leaves, treedef = jax.tree.flatten(params)
  deltas = treedef.flatten_up_to(updates)
  step = jnp.asarray(step, jnp.uint32)
  out = []
  for i, (p, u) in enumerate(zip(leaves, deltas)):
    if p.dtype == jnp.bfloat16:
      seed = ~(step * np.uint32(len(leaves)) + np.uint32(i))
      out.append(round_bfloat16_stochastic(p.astype(jnp.float32) + u.astype(jnp.float32), seed))
    else:
      out.append(jnp.asarray(p + u).astype(p.dtype))
  return treedef.unflatten(out)
