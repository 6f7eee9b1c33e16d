"""A run made ready to step: the method's stages and their lengths, the mesh, the model, the
trained module with its optimizer placed on the mesh, and the jitted step. The training loop,
the benchmarks and the tests build it the same way."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

import epi_jax
from epi_jax.models import ModelConfig
from epi_jax.train.config import Config, OptimSection
from epi_jax.train.methods import Method, Run, make_method
from epi_jax.train.model import build_model
from epi_jax.train.sharding import build_mesh, like_params
from epi_jax.train.step import make_optimizer, make_train_step
from epi_jax.train.tasks import TaskData, load_tasks, steps_per_stage


def num_micro_batches(optim: OptimSection) -> int:
  """Micro-batches per step: ``optim.batch_size`` over ``optim.micro_batch_size`` (0: one)."""
  return optim.batch_size // (optim.micro_batch_size or optim.batch_size)


def init_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    wrt: nnx.filterlib.Filter = nnx.Param,
) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state) of (model, nnx.Optimizer(model, tx, wrt=wrt)), placed on ``mesh`` by
  ``like_params``: each optimizer-state leaf (Adam moments, EPI's sensitivity and bit-packed
  masks) from the sharding metadata of the parameter it mirrors, from the start."""
  optimizer = make_optimizer(model, tx, wrt=wrt)
  state = nnx.state((model, optimizer))
  # One fresh buffer per leaf: an optimizer's init may return one array in two state fields,
  # and the step cannot donate a buffer twice.
  placed = jax.device_put(state, like_params(state, mesh))
  nnx.update((model, optimizer), jax.tree.map(jnp.copy, placed))
  return nnx.split((model, optimizer))


@dataclasses.dataclass
class RunSetup:
  """What ``setup_run`` builds."""

  method: Method
  run: Run  # the config, tasks, stages, total steps, mesh and micro-batches the method saw
  bounds: list[int]  # stage k runs steps bounds[k]+1 .. bounds[k+1]
  model_config: ModelConfig
  group_names: Sequence[str]  # the normalization groups of the model's parameters
  graphdef: nnx.GraphDef
  state: nnx.State  # (trained module, optimizer), placed on the mesh by ``init_state``
  step_fn: Callable  # ``make_train_step``'s step on ``state``


def setup_run(
    config: Config,
    *,
    method: Method | None = None,
    task_data: TaskData | None = None,
    resuming: bool = False,
    stage_steps: list[int] | None = None,
) -> RunSetup:
  """The run ``config`` describes, ready for its first step.

  Args:
    config: the run's config.
    method, task_data: ``make_method(config)`` / ``load_tasks(config)`` when not given.
    resuming: whether a checkpoint's state replaces the fresh one right after (``Run``).
    stage_steps: the stage lengths of the method's schedule; None: the stages' own.
  """
  method = method or make_method(config)
  task_data = task_data or load_tasks(config)
  stages = method.stages()
  lengths = steps_per_stage(config, stages, task_data)
  bounds = np.cumsum([0] + lengths).tolist()
  mesh = build_mesh(config.mesh)
  num_micro = num_micro_batches(config.optim)
  run = Run(
      config=config,
      task_data=task_data,
      stages=stages,
      stage_steps=lengths if stage_steps is None else stage_steps,
      mesh=mesh,
      num_micro=num_micro,
      resuming=resuming,
  )
  model = build_model(config.model, seed=config.train.seed, mesh=mesh)
  group_names = epi_jax.layer_groups(nnx.state(model, nnx.Param), config.method.layer_of).names
  trainable = method.trainable(model, run)
  graphdef, state = init_state(trainable.module, trainable.tx, mesh, wrt=trainable.wrt)
  step_fn = make_train_step(
      graphdef,
      num_micro,
      wrt=trainable.wrt,
      logs=method.step_logs,
      shardings=like_params(state, mesh),
  )
  return RunSetup(method, run, bounds, model.config, group_names, graphdef, state, step_fn)
