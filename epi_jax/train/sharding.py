"""The run's device mesh and the placement of optimizer state and batches on it.

Multi-host: call ``jax.distributed.initialize()`` in every process before anything touches
the devices (``train.py`` does so when ``JAX_COORDINATOR_ADDRESS`` is set); the mesh then spans
all hosts' devices and each host feeds its own slice of every batch.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from epi_jax.models import make_mesh
from epi_jax.models.sharding import batch_sharding, variable_sharding
from epi_jax.train.config import MeshSection


def build_mesh(section: MeshSection) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes over the first data*fsdp*tensor devices."""
  return make_mesh(data=section.data, fsdp=section.fsdp, tensor=section.tensor)


def like_params(tree, model: nnx.Module, mesh: Mesh):
  """Shardings for `tree` (an optimizer state): a leaf shaped like parameters whose shardings
  agree takes that sharding, anything else is replicated."""
  by_shape: dict[tuple, NamedSharding | None] = {}
  for v in jax.tree.leaves(nnx.state(model, nnx.Param),
                           is_leaf=lambda x: isinstance(x, nnx.Variable)):
    s = variable_sharding(v, mesh)
    by_shape[v.shape] = s if by_shape.get(v.shape, s) == s else None
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda x: by_shape.get(np.shape(x)) or replicated, tree)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh | None) -> dict[str, jax.Array]:
  """The (global) batch on the mesh, split along the batch axis over (data, fsdp); with several
  processes each one contributes its own block of rows."""
  if mesh is None:
    return {k: jax.numpy.asarray(v) for k, v in batch.items()}
  n, i = jax.process_count(), jax.process_index()
  return {k: jax.make_array_from_process_local_data(
      batch_sharding(mesh, v.shape), v[i * len(v) // n:(i + 1) * len(v) // n], v.shape)
          for k, v in batch.items()}
