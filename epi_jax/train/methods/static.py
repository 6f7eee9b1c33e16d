"""The static baseline (Section 3.3, CPI-FT): fine-tune a copy of the initial model on each task
alone (the probes), score every parameter by how far the probes moved it, and keep one fixed
top-p mask for the whole run."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

import epi_jax
import epi_jax.data as data
from epi_jax._src.probe import displacement
from epi_jax.train.config import Config
from epi_jax.train.methods.base import Masked, Run, Trainable
from epi_jax.train.optimizer import inner_optimizer
from epi_jax.train.sharding import put_batch
from epi_jax.train.step import make_optimizer, make_train_step
from epi_jax.train.tasks import TaskData


def probe_steps(config: Config, examples: list) -> int:
  """``method.probe_steps``, or one epoch of the task."""
  return config.method.probe_steps or math.ceil(len(examples) / config.optim.batch_size)


def static_mask(
    config: Config, model: nnx.Module, task_data: TaskData, *, mesh: Mesh | None, num_micro: int
) -> nnx.State:
  """The probe mask (True = frozen), a pytree like ``nnx.state(model, nnx.Param)``.

  Each task gets its own probe: AdamW with the run's settings and a warm-up + cosine schedule
  over the probe's steps, starting from the initial weights theta_0. The score of a parameter
  is the sum over tasks of |theta_probe - theta_0|; ``epi_jax.top_p_mask`` keeps the top
  ``method.p`` of it (layer-normalized with ``method.normalize: layer_minmax``). ``model`` is
  left unchanged.
  """
  m = config.method
  theta_0 = nnx.state(model, nnx.Param)
  moved = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), theta_0)
  for k, task in enumerate(config.data.tasks):
    examples = task_data.train[task]
    steps = probe_steps(config, examples)
    probe = nnx.clone(model)
    nnx.update(probe, jax.tree.map(jnp.copy, nnx.state(probe)))  # own buffers: the step donates
    optimizer = make_optimizer(probe, inner_optimizer(config, steps))
    graphdef, state = nnx.split((probe, optimizer))
    step = make_train_step(graphdef, num_micro)
    batches = data.BatchIterator(
        examples,
        batch_size=config.optim.batch_size,
        seq_len=config.data.seq_len,
        pad_id=task_data.encoder.pad_id,
        seed=config.data.seed + 1000 + k,
        pack=config.data.pack,
        pack_window=config.data.pack_window,
    )
    for _ in range(steps):
      state, _ = step(state, put_batch(next(batches), mesh))
    probe, _ = nnx.merge(graphdef, state)
    moved = jax.tree.map(jnp.add, moved, displacement(nnx.state(probe, nnx.Param), theta_0))
  # The summed displacements are the scores: the same selection as probe_mask and EPI.
  return epi_jax.top_p_mask(moved, m.p, normalize=m.normalize, budget=m.budget, layer_of=m.layer_of)


class Static(Masked):
  """AdamW whose update is zeroed on the probe mask, fixed before the first stage."""

  def trainable(self, model: nnx.Module, run: Run) -> Trainable:
    if run.resuming:  # the mask is restored with the optimizer state
      mask = jax.tree.map(lambda x: jnp.zeros(x.shape, bool), nnx.state(model, nnx.Param))
    else:
      mask = static_mask(self.config, model, run.task_data, mesh=run.mesh, num_micro=run.num_micro)
    tx = epi_jax.static_isolation(inner_optimizer(self.config, run.stage_steps), mask)
    return Trainable(model, tx)
