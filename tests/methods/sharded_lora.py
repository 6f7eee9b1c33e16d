"""Run as ``python sharded_lora.py BASE ADAPTER`` with 8 host devices: places a model and its LoRA
adapters on a data=2, fsdp=2, tensor=2 mesh (unscanned and scanned) and prints a JSON report
of the adapters' placement and of the adapted logits against the unsharded ones."""

import json
import sys

import jax
import numpy as np
from flax import nnx

from epi_jax.models import lora, lora_peft
from epi_jax.models import from_pretrained, make_mesh


def main(base: str, adapter: str) -> dict:
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  ids = np.random.default_rng(0).integers(3, 300, (4, 10)).astype(np.int32)
  forward = nnx.jit(
      lambda model, adapters, config: lora.adapted(model, adapters, config)(ids), static_argnums=2
  )
  plain, _ = from_pretrained(base)
  adapters, config = lora_peft.load_adapter(plain, adapter)
  want = np.asarray(forward(plain, adapters, config))
  report = {"devices": len(jax.devices())}
  for scan in (False, True):
    model, _ = from_pretrained(base, mesh=mesh, scan_layers=scan)
    loaded, _ = lora_peft.load_adapter(model, adapter, mesh=mesh)
    fresh = lora.init_adapters(model, config, key=jax.random.key(0), mesh=mesh)
    q = loaded["layers"]["attn"]["q"] if scan else loaded["layers"][0]["attn"]["q"]
    o = fresh["layers"]["attn"]["o"] if scan else fresh["layers"][0]["attn"]["o"]
    report[f"scan={scan}"] = {
        "q_a_spec": list(q["a"].sharding.spec),
        "q_b_spec": list(q["b"].sharding.spec),
        "o_a_spec": list(o["a"].sharding.spec),
        "o_b_spec": list(o["b"].sharding.spec),
        "max_abs_diff": float(np.abs(np.asarray(forward(model, loaded, config)) - want).max()),
    }
  return report


if __name__ == "__main__":
  print(json.dumps(main(*sys.argv[1:3])))
