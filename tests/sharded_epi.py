"""Runs EPI on a 2x4 mesh of simulated CPU devices; prints a JSON verdict.

Started by tests/test_sharding.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax is imported.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import epi_jax


def main():
  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "model"))
  rng = np.random.default_rng(0)
  shapes = {"embed": (64, 32), "layers": [{"w": (32, 64), "b": (64,)} for _ in range(3)]}
  specs = {"embed": P("data", "model"), "layers": [{"w": P(None, "model"), "b": P("model")}] * 3}
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s), jnp.float32),
      shapes,
      is_leaf=lambda s: isinstance(s, tuple),
  )
  grads = [
      jax.tree.map(
          lambda x: jnp.asarray(
              rng.normal(size=x.shape) * 10.0 ** rng.integers(-2, 2), jnp.float32
          ),
          params,
      )
      for _ in range(4)
  ]
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
  results = {}
  for sensitivity in ("grad_sq", "adam_nu"):
    tx = epi_jax.epi(optax.adamw(1e-2), p=0.05, interval=2, sensitivity=sensitivity)

    def run(params, grads):
      state = jax.jit(tx.init)(params)
      step = jax.jit(lambda p, s, g: tx.update(g, s, p))
      for g in grads:
        updates, state = step(params, state, g)
        params = optax.apply_updates(params, updates)
      return params, state

    single_params, single_state = run(params, grads)
    sharded_params, sharded_state = run(
        jax.device_put(params, shardings), [jax.device_put(g, shardings) for g in grads]
    )
    same_mask = all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(epi_jax.protection_mask(single_state)),
            jax.tree.leaves(epi_jax.protection_mask(sharded_state)),
        )
    )
    close = all(
        np.allclose(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(single_params), jax.tree.leaves(sharded_params))
    )
    like = [sharded_state.mask]  # bits packed along the last axis, same spec
    if sensitivity == "grad_sq":
      like.append(epi_jax.sensitivity_of(sharded_state))
    shard_like = all(
        leaf.sharding.is_equivalent_to(s, leaf.ndim)
        for tree in like
        for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
    )
    results[sensitivity] = {
        "same_mask": same_mask,
        "params_close": close,
        "state_sharded_like_params": shard_like,
        "protected": int(
            sum(np.sum(m) for m in jax.tree.leaves(epi_jax.protection_mask(sharded_state)))
        ),
        "devices": len(jax.devices()),
    }
  print(json.dumps(results))


if __name__ == "__main__":
  main()
