"""EWC as a method of the trainer: after each stage but the last, the diagonal empirical Fisher
of that stage's batches joins the penalty whose gradient ``ewc.penalty_gradient`` adds before
AdamW (``epi_jax._src.ewc``).

The Fisher is the empirical one: the mean over examples n of the squared per-example gradient
g_n = grad_theta l_n(theta*), with l_n the response-token cross-entropy of
``models.loss.response_loss`` for example n alone (its summed CE over its response tokens /
their count). An example is a batch row (with packed rows, a row's examples together); rows
without response tokens are left out of the mean.

>>> fisher = fisher_diagonal(model, batches_of_stage_1)
>>> state = ewc.consolidate(state, nnx.state(model, nnx.Param), fisher)
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import epi_jax.data as data
from epi_jax._src import ewc
from epi_jax._src.state import find_state
from epi_jax.models.loss import BATCH_KEYS, micro_batches, response_loss
from epi_jax.train.methods.base import (
    EXTRA_MEMORY_HEADER,
    GIB,
    Method,
    Run,
    Trainable,
    extra_memory_line,
)
from epi_jax.train.optimizer import inner_optimizer
from epi_jax.train.sharding import put_batch

FISHER_SEED = 2000
"""Offset of the data seed for the Fisher batches of stage k (seed + FISHER_SEED + k)."""


def _row_loss(model: nnx.Module, row: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(loss, response-token count) of one row [T]: its summed response CE / count (0 if none)."""
  total, count = response_loss(model, {k: row[k][None] for k in BATCH_KEYS})
  return total / jnp.maximum(count, 1.0), count


def example_losses(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Per-example losses [B] and response-token counts [B] of ``batch`` (``models.loss.BATCH_KEYS``)."""
  return jax.vmap(lambda row: _row_loss(model, row))({k: batch[k] for k in BATCH_KEYS})


@functools.partial(jax.jit, static_argnames=("graphdef", "chunks"))
def _squared_grad_sums(graphdef, params, rest, batch, chunks):
  """(sum over rows with response tokens of g_n^2 in float32, number of such rows); the
  per-example gradients of one chunk of rows at a time are vmapped."""

  def loss(params, row):
    return _row_loss(nnx.merge(graphdef, params, rest), row)

  per_example = jax.vmap(jax.grad(loss, has_aux=True), in_axes=(None, 0))

  def add_chunk(sums, rows):
    grads, counts = per_example(params, rows)
    valid = (counts > 0).astype(jnp.float32)
    sums = jax.tree.map(
        lambda s, g: s + jnp.tensordot(valid, jnp.square(g.astype(jnp.float32)), axes=1),
        sums,
        grads,
    )
    return sums, jnp.sum(valid)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  sums, valid = jax.lax.scan(add_chunk, zeros, micro_batches(batch, chunks))
  return sums, jnp.sum(valid)


def fisher_diagonal(
    model: nnx.Module,
    batches: Iterable[dict[str, jax.Array]],
    *,
    examples_per_chunk: int | None = None,
):
  """The diagonal empirical Fisher of the model's ``nnx.Param`` over ``batches``.

  F = (1 / N) sum_n g_n * g_n over the N examples (rows) with response tokens, g_n the
  gradient of that example's loss alone (see the module docstring), in float32.

  Args:
    model: the Decoder at the end of a stage (theta*).
    batches: dicts with ``models.loss.BATCH_KEYS``, [B, T] each (e.g. ``method.ewc.fisher_batches``
      batches of the stage's iterator); B may differ between batches.
    examples_per_chunk: per-example gradients held at once (vmapped), a divisor of every B;
      None: a whole batch. Memory: this many gradient copies.

  Returns:
    float32 arrays shaped like ``nnx.state(model, nnx.Param)``.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  total, examples = None, jnp.float32(0)
  for i, batch in enumerate(batches):
    rows = batch["input_ids"].shape[0]
    chunk = examples_per_chunk or rows
    if chunk < 1 or rows % chunk:
      raise ValueError(
          f"examples_per_chunk={examples_per_chunk} does not divide the {rows} "
          f"rows of batch {i}"
      )
    sums, valid = _squared_grad_sums(graphdef, params, rest, batch, rows // chunk)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    examples = examples + valid
  if total is None:
    raise ValueError("fisher_diagonal needs at least one batch")
  return jax.tree.map(lambda s: s / jnp.maximum(examples, 1.0), total)


class EWCMemory(NamedTuple):
  """Bytes EWC adds (whole model, before sharding)."""

  fisher: int  # F, float32, kept through later stages
  anchor: int  # theta*, float32, kept through later stages
  fisher_pass: int  # while computing F: one chunk of per-example gradients + float32 sums
  base_parameters: int

  @property
  def per_base_parameter(self) -> float:
    """Bytes per parameter kept during training (Fisher and anchor)."""
    return (self.fisher + self.anchor) / self.base_parameters


def memory_bytes(model: nnx.Module, *, examples_per_chunk: int) -> EWCMemory:
  """The extra memory of EWC for the dry-run plan, from shapes only (abstract models work)."""
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  count = sum(math.prod(p.shape) for p in params)
  grads = sum(math.prod(p.shape) * jnp.dtype(p.dtype).itemsize for p in params)
  return EWCMemory(
      fisher=4 * count,
      anchor=4 * count,
      fisher_pass=examples_per_chunk * grads + 4 * count,
      base_parameters=count,
  )


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _ewc_variables(optimizer: nnx.Optimizer) -> ewc.EWCState:
  """The EWCState inside the optimizer state, its leaves the optimizer's own variables."""
  return find_state(optimizer.opt_state, (ewc.EWCState,), unwrap=False)


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
        inner_optimizer(self.config, run.stage_steps),
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
    fisher = fisher_diagonal(
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

  def memory_plan(self, model: nnx.Module, plan: dict, fraction: float) -> dict:
    """The Fisher and the anchor kept through training, and the Fisher pass's peak
    (``memory_bytes``)."""
    o = self.config.optim
    chunk = self.config.method.ewc.examples_per_chunk or o.micro_batch_size or o.batch_size
    fisher = memory_bytes(model, examples_per_chunk=chunk)
    kept = fisher.fisher + fisher.anchor
    return {
        "extra_bytes_per_param": fisher.per_base_parameter,
        "extra_gib": kept * fraction / GIB,
        "fisher_pass_gib": fisher.fisher_pass * fraction / GIB,
        "total_gib": plan["total_without_epi_gib"] + kept * fraction / GIB,
    }

  def memory_table(self, rows: dict) -> tuple[str, list[str]]:
    note = f"(+{rows['fisher_pass_gib']:.2f} while computing F)"
    return EXTRA_MEMORY_HEADER, [extra_memory_line("ewc (Fisher + anchor)", rows, note)]
