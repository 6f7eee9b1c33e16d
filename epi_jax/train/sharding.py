"""The run's device mesh and the placement of optimizer state and batches on it.

Multi-host: every process joins the run first (``epi_jax.train.distributed``; ``train.py``
does so from the ``JAX_*`` environment variables); the mesh then spans all hosts' devices, and
each process builds the same global batch and places the rows its own devices hold.
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


def like_params(tree, mesh: Mesh):
  """Shardings for ``tree`` (a model's or an optimizer's state) from each variable's logical-axis
  metadata: parameters get the shardings ``shard_model`` gives them, and their optimizer state
  follows them.

  ``nnx.Optimizer`` carries every parameter's metadata, ``out_sharding`` included, onto the
  state leaves built from it (Adam moments, EPI's sensitivity and masks), so a leaf is placed
  by its parameter's logical names, whatever its shape: a bit-packed mask (last axis 8 times
  shorter) takes its parameter's spec on the axes they share, and its packed last axis is
  split over its mesh axis only where that axis divides the packed length (else that dimension
  is replicated, as ``logical_spec`` does for any dimension). Leaves without names of their
  own rank (counters, per-group statistics) are replicated.
  """
  replicated = NamedSharding(mesh, PartitionSpec())

  def place(leaf):
    names = leaf.get_metadata().get("out_sharding") if isinstance(leaf, nnx.Variable) else None
    return variable_sharding(leaf, mesh) if names and len(names) == leaf.ndim else replicated

  return jax.tree.map(place, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh | None) -> dict[str, jax.Array]:
  """The global batch on the mesh, split along the batch axis over (data, fsdp). Every process
  passes the same whole batch and copies only the rows its own devices hold, wherever the
  mesh puts them."""
  if mesh is None:
    return {k: jax.numpy.asarray(v) for k, v in batch.items()}
  return {
      k: jax.make_array_from_callback(
          v.shape, batch_sharding(mesh, v.shape), lambda index, v=v: v[index]
      )
      for k, v in batch.items()
  }
