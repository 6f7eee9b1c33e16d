"""The static baseline: probe runs give one top-p mask, and training never moves those entries."""

import jax
import numpy as np
from flax import nnx

from epi_jax.train.loading import load_config
from epi_jax.train.setup import init_state
from epi_jax.train.model import build_model
from epi_jax.train.methods import Run, make_method
from epi_jax.train.methods.static import static_mask
from epi_jax.train.sharding import build_mesh, put_batch
from epi_jax.train.step import make_train_step
from epi_jax.train.tasks import load_tasks, stage_iterators
from tiny_run import tiny_config_file


def test_static_mask_from_probes_freezes_its_entries(tmp_path):
  config = load_config(
      tiny_config_file(tmp_path), ["method.type=static", "method.p=0.1", "method.probe_steps=2"]
  )
  mesh = build_mesh(config.mesh)
  task_data = load_tasks(config)
  model = build_model(config.model, seed=0, mesh=mesh)
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  mask = static_mask(config, model, task_data, mesh=mesh, num_micro=2)

  flags = [np.asarray(m) for m in jax.tree.leaves(mask)]
  total = sum(m.size for m in flags)
  assert sum(m.sum() for m in flags) == int(0.1 * total)
  assert jax.tree.structure(mask) == jax.tree.structure(nnx.state(model, nnx.Param))
  same = jax.tree.map(np.array_equal, before, jax.tree.map(np.asarray, nnx.state(model, nnx.Param)))
  assert all(jax.tree.leaves(same)), "the probes must not change the model"

  method = make_method(config)
  run = Run(
      config=config,
      task_data=task_data,
      stages=method.stages(),
      stage_steps=[4],
      mesh=mesh,
      num_micro=2,
      resuming=False,
  )
  trainable = method.trainable(model, run)  # probes again: the same mask
  graphdef, state = init_state(trainable.module, trainable.tx, mesh)
  step = make_train_step(graphdef, 2)
  batches = stage_iterators(config, run.stages, task_data)[0]
  for _ in range(2):
    state, _ = step(state, put_batch(next(batches), mesh))
  after = jax.tree.map(np.asarray, nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))
  frozen = [
      np.array_equal(a[m], b[m])
      for a, b, m in zip(jax.tree.leaves(after), jax.tree.leaves(before), flags)
  ]
  moved = [
      not np.array_equal(a[~m], b[~m])
      for a, b, m in zip(jax.tree.leaves(after), jax.tree.leaves(before), flags)
  ]
  assert all(frozen) and any(moved)
