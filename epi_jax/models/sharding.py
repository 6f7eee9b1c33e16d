"""Logical axis names of the decoder's parameters and their placement on a (data, fsdp, tensor) mesh."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (None: replicated). Batch goes over data and fsdp; weights are
# split over fsdp along the model width and over tensor along heads, MLP width and vocabulary.
RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
}


def make_mesh(
    data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A mesh with Auto axes ('data', 'fsdp', 'tensor') over the first data*fsdp*tensor devices."""
  devices = jax.devices() if devices is None else list(devices)
  size = data * fsdp * tensor
  if size < 1 or size > len(devices):
    raise ValueError(
        f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {size} devices, "
        f"{len(devices)} available"
    )
  return Mesh(np.asarray(devices[:size]).reshape(data, fsdp, tensor), MESH_AXES)


def logical_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None] = RULES,
) -> PartitionSpec:
  """PartitionSpec for an array with logical axis ``names``.

  A dimension stays replicated when its rule names a mesh axis already used by an earlier
  dimension or when the mesh axes do not divide it (e.g. 4 kv heads on tensor=8).
  """
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape, strict=True):
    axes = rules.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.shape and a not in used)
    if not axes or dim % int(np.prod([mesh.shape[a] for a in axes])):
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
  """The NamedSharding of a parameter from its ``out_sharding`` logical names."""
  names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
  return NamedSharding(mesh, logical_spec(names, variable.shape, mesh))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Moves every parameter of ``model`` onto ``mesh`` following RULES, in place; returns ``model``."""
  state = nnx.state(model)
  placed = jax.tree.map(
      lambda v: v.replace(jax.device_put(v.get_value(), variable_sharding(v, mesh))),
      state,
      is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  nnx.update(model, placed)
  return model


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """Sharding of a [batch, ...] input: batch over ('data', 'fsdp'), the rest replicated."""
  names = ("batch",) + (None,) * (len(shape) - 1)
  return NamedSharding(mesh, logical_spec(names, shape, mesh))
