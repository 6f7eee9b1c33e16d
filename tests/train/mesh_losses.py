"""Run as ``python mesh_losses.py CONFIG`` with 8 host devices (XLA_FLAGS set by the caller):
runs the first training steps of the config on one device and on a data=2 x fsdp=4 mesh and
prints the losses of both as JSON."""

import json
import sys

import jax

from epi_jax.train.loading import load_config
from epi_jax.train.setup import setup_run
from epi_jax.train.sharding import put_batch
from epi_jax.train.tasks import stage_iterators


def losses(path: str, mesh_overrides: list[str], steps: int = 6) -> list[float]:
  config = load_config(path, mesh_overrides)
  setup = setup_run(config, stage_steps=[steps])
  run, state, step = setup.run, setup.state, setup.step_fn
  batches = stage_iterators(config, run.stages, run.task_data)[0]
  out = []
  for _ in range(steps):
    state, metrics = step(state, put_batch(next(batches), run.mesh))
    out.append(float(metrics["loss"]))
  return out


if __name__ == "__main__":
  print(
      json.dumps(
          {
              "devices": jax.device_count(),
              "single": losses(sys.argv[1], []),
              "mesh": losses(sys.argv[1], ["mesh.data=2", "mesh.fsdp=4"]),
          }
      )
  )
