"""What the trainer asks of a training method: ``Method``, and the ``Run`` it prepares in.

A method says everything that differs between methods: how tasks form stages, which module is
trained and by which optax transformation, what it prepares before training or between stages,
what its step logs and records (mask refreshes, the protected fraction), which model is
evaluated, what it adds to summary.json, what it writes at the end and what memory it needs
beside plain AdamW (the dry run's plan). The loop and the memory plan call these hooks and never
test a method's name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

import epi_jax.data as data
from epi_jax._src.state import protection_mask
from epi_jax.train.config import Config
from epi_jax.train.optimizer import inner_optimizer
from epi_jax.train.tasks import TaskData

GIB = 2.0**30
EXTRA_MEMORY_HEADER = "  other methods            extra   bytes/param   total"


def tree_bytes(tree) -> int:
  """Bytes of the arrays (or ``jax.ShapeDtypeStruct``s) of ``tree``."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def extra_memory_line(label: str, rows: dict, note: str) -> str:
  """A line under ``EXTRA_MEMORY_HEADER``: a method's extra GiB and bytes per parameter and its
  total, from rows with ``extra_gib``, ``extra_bytes_per_param`` and ``total_gib``."""
  return (
      f"  {label:24s} {rows['extra_gib']:5.2f} {rows['extra_bytes_per_param']:13.2f} "
      f"{rows['total_gib']:7.2f}   {note}"
  )


@dataclasses.dataclass(frozen=True)
class Run:
  """What a method may use while it prepares: the run's data, plan and devices."""

  config: Config
  task_data: TaskData
  stages: list[list[str]]
  stage_steps: list[int]  # optimizer steps of each stage
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
    self.protected = 0.0  # the protected fraction the train records log (``begin_session``)

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
    return Trainable(model, inner_optimizer(self.config, run.stage_steps))

  def step_logs(self, module: nnx.Module, optimizer: nnx.Optimizer) -> dict:
    """Arrays the jitted step returns beside loss and tokens, computed after the update; what
    ``refresh`` and ``step_record`` read."""
    return {}

  def protected_fraction(self, optimizer: nnx.Optimizer) -> float:
    """Fraction of all parameters whose update the method's mask zeroes now: 0 without one."""
    return 0.0

  def begin_session(self, optimizer: nnx.Optimizer, mask_history: list[dict]) -> None:
    """Before a session's first step, with its fresh or restored optimizer and the run's mask
    history so far: the protected fraction ``step_record`` logs until the next refresh."""
    self.protected = self.protected_fraction(optimizer)

  def refresh(self, out: dict) -> dict | None:
    """The statistics (host arrays) of the mask refresh made by the step whose ``step_logs``
    are in ``out``, logged as kind ``mask`` and kept in the mask history; None: no refresh."""
    return None

  def refreshed_masks(self, opt_state) -> dict:
    """The masks a refresh leaves, by path, as kept with ``checkpoint.mask_history: full``
    (gathered from all processes: every process calls it)."""
    return {}

  def step_record(self, out: dict) -> dict:
    """The train record's fields beside loss, lr, tokens/s and stage: the protected fraction,
    then the scalars of ``step_logs`` in ``out``."""
    extra = {key: v for key, v in out.items() if key not in ("loss", "tokens")}
    return {"protected_fraction": self.protected} | extra

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

  def memory_plan(self, model: nnx.Module, plan: dict, fraction: float) -> dict:
    """This method's rows of the dry run's memory plan (``train.memory``); empty: nothing beside
    plain AdamW. ``model`` is abstract, ``plan`` holds the base buffers' per-device GiB
    (``params_gib``, ``grads_gib``, ``adam_moments_gib``, ``activations_gib``,
    ``total_without_epi_gib``) and one device holds ``fraction`` of each parameter-shaped buffer.
    """
    return {}

  def memory_table(self, rows: dict) -> tuple[str, list[str]]:
    """The dry run's table of ``rows`` (this method's ``memory_plan``): its header line (methods
    with the same header share one) and its lines."""
    return "", []


class Masked(Method):
  """A method whose optimizer state holds a protection mask (EPI's or the static one)."""

  def protected_fraction(self, optimizer: nnx.Optimizer) -> float:
    mask = jax.tree.leaves(protection_mask(optimizer.opt_state))
    return float(sum(jnp.sum(m) for m in mask) / sum(m.size for m in mask))

  def summary(self, module: nnx.Module, optimizer: nnx.Optimizer) -> dict:
    return {"protected_fraction": self.protected_fraction(optimizer)}
