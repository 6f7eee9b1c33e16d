"""Per-device bytes of the parameters and of every optimizer-state field right after
``init_state`` (``setup_run``), and whether training steps keep that placement.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python benchmarks/state_sharding.py --config configs/demo.yaml \\
        --set mesh.data=2 --set mesh.fsdp=4 [--steps 2] [--json]

Prints one row per field (params; Adam mu and nu; EPI sensitivity, mask, first_mask; the rest):
its full size, the bytes the most loaded device holds, and their ratio; then the number of
compilations of the train step and the leaves whose sharding the steps changed. ``--json``
prints instead one JSON object with every leaf's path, shape, partition spec and bytes, at
init and after the steps (what tests/train/test_state_sharding.py checks).
"""

from __future__ import annotations

import argparse
import collections
import json

import jax

from epi_jax.train.loading import load_config
from epi_jax.train.setup import setup_run
from epi_jax.train.sharding import put_batch
from epi_jax.train.tasks import stage_iterators

FIELDS = ("mu", "nu", "sensitivity", "first_mask", "mask")


def leaves(state) -> list[dict]:
  """Path, shape, dtype, partition spec (one list of mesh axes per dimension) and bytes (all,
  and per device) of every array of a (model, optimizer) state."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    spec = list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))
    per_device = collections.Counter()
    for shard in x.addressable_shards:
      per_device[shard.device.id] += shard.data.nbytes
    out.append(
        {
            "path": jax.tree_util.keystr(path),
            "shape": list(x.shape),
            "dtype": str(x.dtype),
            "full": x.nbytes,
            "per_device": dict(per_device),
            "spec": [[] if a is None else [a] if isinstance(a, str) else list(a) for a in spec],
        }
    )
  return out


def field(path: str) -> str:
  """The row of the table a leaf belongs to."""
  if path.startswith("[0]"):
    return "params"
  return next((f for f in FIELDS if f"['{f}']" in path), "other")


def measure(config_path: str, overrides: list[str], steps: int) -> dict:
  """The state's placement at init and after ``steps`` train steps, and the step's compiles."""
  config = load_config(config_path, overrides)
  setup = setup_run(config, stage_steps=[steps])
  run, state, step = setup.run, setup.state, setup.step_fn
  mesh = run.mesh
  init = leaves(state)
  batches = stage_iterators(config, run.stages, run.task_data)[0]
  for _ in range(steps):
    state, _ = step(state, put_batch(next(batches), mesh))
  return {
      "mesh": dict(mesh.shape),
      "init": init,
      "after": leaves(state),
      "compiles": step._cache_size(),
  }


def table(result: dict) -> str:
  """Full and most-loaded-device bytes per field, then the compile count and changed leaves."""
  full, per_device = collections.Counter(), collections.defaultdict(collections.Counter)
  for leaf in result["init"]:
    full[field(leaf["path"])] += leaf["full"]
    per_device[field(leaf["path"])].update(leaf["per_device"])
  mesh = " x ".join(f"{k}={v}" for k, v in result["mesh"].items())
  lines = [f"mesh {mesh}", f"{'field':<12} {'full KiB':>12} {'per device KiB':>15} {'ratio':>7}"]
  for name in ("params",) + FIELDS + ("other",):
    if full[name]:
      most = max(per_device[name].values())
      lines.append(
          f"{name:<12} {full[name] / 1024:>12.1f} {most / 1024:>15.1f} "
          f"{most / full[name]:>7.3f}"
      )
  moved = [a["path"] for a, b in zip(result["init"], result["after"]) if a["spec"] != b["spec"]]
  lines.append(
      f"train step compiled {result['compiles']}x; leaves re-sharded by the steps: "
      f"{moved or 'none'}"
  )
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  result = measure(args.config, args.set, args.steps)
  print(json.dumps(result) if args.json else table(result))


if __name__ == "__main__":
  main()
