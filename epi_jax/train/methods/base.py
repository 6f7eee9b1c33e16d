"""What the trainer asks of a training method: ``Method``, and the ``Run`` it prepares in.

A method says everything that differs between methods: how tasks form stages, which module is
trained and by which optax transformation, what it prepares before training or between stages,
what its step logs, which model is evaluated, what it adds to summary.json and what it writes
at the end. The loop calls these hooks and never tests a method's name.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import optax
from flax import nnx
from jax.sharding import Mesh

import epi_jax.data as data
from epi_jax.train.config import Config
from epi_jax.train.optimizer import inner_optimizer
from epi_jax.train.tasks import TaskData


@dataclasses.dataclass(frozen=True)
class Run:
  """What a method may use while it prepares: the run's data, plan and devices."""

  config: Config
  task_data: TaskData
  stages: list[list[str]]
  total_steps: int
  mesh: Mesh
  num_micro: int
  resuming: bool  # the trained state is restored from a checkpoint right after ``trainable``


@dataclasses.dataclass(frozen=True)
class Trainable:
  """The module the step trains, the variables it updates and their optax transformation."""

  module: nnx.Module
  tx: optax.GradientTransformation
  wrt: nnx.filterlib.Filter = nnx.Param


class Method:
  """Stages in sequence with plain AdamW; subclasses override what they change."""

  analyses: ClassVar[tuple[str, ...]] = ("continual", "gradient_conflict", "task_overlap", "nll")
  """The ``eval.analyses`` this method can serve."""

  def __init__(self, config: Config):
    self.config = config

  def problems(self) -> list[str]:
    """Problems of the config for this method, each naming its key."""
    return []

  def stages(self) -> list[list[str]]:
    """The tasks of each training stage, in order (``method.grouping``)."""
    m, tasks = self.config.method, list(self.config.data.tasks)
    if m.grouping == "random":
      return data.random_grouping(tasks, m.num_stages, seed=self.config.data.seed)
    if m.grouping == "heuristic":
      synthetic = self.config.data.source == "synthetic"
      return data.skill_grouping(tasks, data.TASK_SKILLS if synthetic else data.DATASET_SKILLS)
    return [list(s) for s in m.stages] or [[t] for t in tasks]

  def peak_learning_rate(self) -> float:
    """The peak of the learning-rate schedule this method trains with (``optim.lr``)."""
    return self.config.optim.lr

  def trainable(self, model: nnx.Module, run: Run) -> Trainable:
    """What the step trains: every parameter of ``model`` with AdamW."""
    return Trainable(model, inner_optimizer(self.config, run.total_steps))

  def step_logs(self, module: nnx.Module, optimizer: nnx.Optimizer) -> dict:
    """Arrays the jitted step returns beside loss and tokens, computed after the update.

    A method that refreshes a mask returns ``refreshed`` (a bool) and ``refresh`` (that
    refresh's statistics), so the loop records refreshes without knowing their schedule; any
    other entry is a scalar logged with the loss.
    """
    return {}

  def eval_model(self, module: nnx.Module) -> nnx.Module:
    """The Decoder that evaluation and the analyses see, and that ``<run_dir>/model`` holds."""
    return module

  def after_stage(self, stage: int, module: nnx.Module, optimizer: nnx.Optimizer, run: Run) -> dict:
    """Work after stage ``stage``'s evaluation, in place on the merged state; returns what to
    log (kind ``method``)."""
    return {}

  def summary(self, module: nnx.Module, optimizer: nnx.Optimizer) -> dict:
    """Entries the method adds to summary.json."""
    return {}

  def export(self, module: nnx.Module, run_dir: str) -> None:
    """Files the method writes into the run directory at the end of training."""
