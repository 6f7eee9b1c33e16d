"""Run as ``python mesh_losses.py CONFIG`` with 8 host devices (XLA_FLAGS set by the caller):
runs the first training steps of the config on one device and on a data=2 x fsdp=4 mesh and
prints the losses of both as JSON."""

import json
import sys

import jax

from epi_jax.train.loading import load_config
from epi_jax.train.loop import init_state
from epi_jax.train.model import build_model
from epi_jax.train.methods import Run, make_method
from epi_jax.train.sharding import build_mesh, put_batch
from epi_jax.train.step import make_train_step
from epi_jax.train.tasks import load_tasks, stage_iterators


def losses(path: str, mesh_overrides: list[str], steps: int = 6) -> list[float]:
  config = load_config(path, mesh_overrides)
  mesh = build_mesh(config.mesh)
  task_data = load_tasks(config)
  method = make_method(config)
  run = Run(
      config=config,
      task_data=task_data,
      stages=method.stages(),
      total_steps=steps,
      mesh=mesh,
      num_micro=config.optim.batch_size // config.optim.micro_batch_size,
      resuming=False,
  )
  batches = stage_iterators(config, run.stages, task_data)[0]
  model = build_model(config.model, seed=config.train.seed, mesh=mesh)
  trainable = method.trainable(model, run)
  graphdef, state = init_state(trainable.module, trainable.tx, mesh)
  step = make_train_step(graphdef, config.optim.batch_size // config.optim.micro_batch_size)
  out = []
  for _ in range(steps):
    state, metrics = step(state, put_batch(next(batches), mesh))
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
