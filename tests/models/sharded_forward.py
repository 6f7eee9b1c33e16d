"""Run as ``python sharded_forward.py CHECKPOINT...`` with 8 host devices: loads each checkpoint
unsharded and on a data=2, fsdp=2, tensor=2 mesh, and prints a JSON report comparing the two."""

import json
import sys

import jax
import numpy as np
from flax import nnx

from epi_jax.models import from_pretrained, make_mesh
from epi_jax.models.generate import generate
from epi_jax.models.sharding import batch_sharding


def main(path: str) -> dict:
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  plain, _ = from_pretrained(path)
  sharded, _ = from_pretrained(path, mesh=mesh)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 300, (4, 12)).astype(np.int32)
  mask = (np.arange(12)[None] >= np.array([[0], [3], [5], [0]])).astype(np.int32)

  forward = nnx.jit(lambda model, ids, mask: model(ids, mask))
  want = np.asarray(forward(plain, ids, mask))
  got = forward(
      sharded,
      jax.device_put(ids, batch_sharding(mesh, ids.shape)),
      jax.device_put(mask, batch_sharding(mesh, mask.shape)),
  )
  q = sharded.layers[0].attn.q[...]
  real = mask.astype(bool)
  return {
      "devices": jax.device_count(),
      "q_spec": [str(a) for a in q.sharding.spec],
      "q_shard_shape": list(q.addressable_shards[0].data.shape),
      "q_shape": list(q.shape),
      "logits_sharding_devices": len(got.sharding.device_set),
      "max_abs_diff": float(np.abs(np.asarray(got)[real] - want[real]).max()),
      "greedy_equal": bool(
          (
              np.asarray(generate(sharded, ids, mask, max_new_tokens=6))
              == np.asarray(generate(plain, ids, mask, max_new_tokens=6))
          ).all()
      ),
  }


if __name__ == "__main__":
  print(json.dumps({path: main(path) for path in sys.argv[1:]}))
