"""EWC as a method of the trainer: after each stage but the last, the diagonal empirical Fisher
of that stage's batches joins the penalty whose gradient ``ewc.penalty_gradient`` adds before
AdamW (``epi_jax.methods.ewc``)."""

from __future__ import annotations

import time

import jax
import optax
from flax import nnx

import epi_jax.data as data
from epi_jax.methods import ewc
from epi_jax.train.methods.base import Method, Run, Trainable
from epi_jax.train.optimizer import inner_optimizer
from epi_jax.train.sharding import put_batch

FISHER_SEED = 2000
"""Offset of the data seed for the Fisher batches of stage k (seed + FISHER_SEED + k)."""


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _ewc_variables(optimizer: nnx.Optimizer) -> ewc.EWCState:
  """The EWCState inside the optimizer state, its leaves the optimizer's own variables."""
  found = [
      x
      for x in jax.tree.leaves(optimizer.opt_state, is_leaf=lambda x: isinstance(x, ewc.EWCState))
      if isinstance(x, ewc.EWCState)
  ]
  if len(found) != 1:
    raise ValueError(f"expected one EWCState in the optimizer state, found {len(found)}")
  return found[0]


def _values(tree):
  return jax.tree.map(lambda v: v.get_value(), tree, is_leaf=_is_variable)


class EWC(Method):
  """AdamW on the task loss plus lambda/2 sum F (theta - theta*)^2 of the finished stages."""

  def problems(self) -> list[str]:
    c, batch = self.config.method.ewc, self.config.optim.batch_size
    if c.examples_per_chunk and batch % c.examples_per_chunk:
      return [
          f"method.ewc.examples_per_chunk: must divide optim.batch_size={batch}, "
          f"got {c.examples_per_chunk}"
      ]
    return []

  def trainable(self, model: nnx.Module, run: Run) -> Trainable:
    tx = optax.chain(
        ewc.penalty_gradient(self.config.method.ewc.lam),
        inner_optimizer(self.config, run.total_steps),
    )
    return Trainable(model, tx)

  def step_logs(self, module: nnx.Module, optimizer: nnx.Optimizer) -> dict:
    params = _values(nnx.state(module, nnx.Param))
    return {
        "ewc_penalty": ewc.penalty(
            params, _values(_ewc_variables(optimizer)), lam=self.config.method.ewc.lam
        )
    }

  def after_stage(self, stage: int, module: nnx.Module, optimizer: nnx.Optimizer, run: Run) -> dict:
    """Consolidates stage ``stage`` (not the last: no stage follows to protect it)."""
    if stage == len(run.stages) - 1:
      return {}
    c, d, o = self.config.method.ewc, self.config.data, self.config.optim
    start = time.perf_counter()
    examples = [e for task in run.stages[stage] for e in run.task_data.train[task]]
    it = data.BatchIterator(
        examples,
        batch_size=o.batch_size,
        seq_len=d.seq_len,
        pad_id=run.task_data.encoder.pad_id,
        seed=d.seed + FISHER_SEED + stage,
        pack=d.pack,
        pack_window=d.pack_window,
    )
    fisher = ewc.fisher_diagonal(
        module,
        (put_batch(next(it), run.mesh) for _ in range(c.fisher_batches)),
        examples_per_chunk=c.examples_per_chunk or None,
    )
    variables = _ewc_variables(optimizer)
    new = ewc.consolidate(
        _values(variables),
        _values(nnx.state(module, nnx.Param)),
        fisher,
        gamma=c.gamma if c.online else None,
    )
    jax.tree.map(
        lambda v, x: v.set_value(jax.device_put(x, v.get_value().sharding)),
        variables,
        new,
        is_leaf=_is_variable,
    )
    total = sum(float(f.sum()) for f in jax.tree.leaves(fisher))
    count = sum(f.size for f in jax.tree.leaves(fisher))
    return {
        "stage": stage,
        "fisher_mean": total / count,
        "consolidations": int(new.consolidations),
        "fisher_time_s": time.perf_counter() - start,
    }
