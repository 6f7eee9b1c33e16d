"""One run over several processes (one per host): joining it, and reading its global arrays.

Every process runs the same command; the environment tells it which one it is:
``JAX_COORDINATOR_ADDRESS`` (host:port where process 0 serves the coordinator),
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (0 .. N-1). Any of the three left unset is
detected by ``jax.distributed.initialize`` where it can be (SLURM, Open MPI, Kubernetes,
Cloud TPU). On CPU the processes exchange collectives over gloo (JAX's default CPU
collectives). docs/trainer.md, "Multi-host", shows a launch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

ENVIRONMENT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_from_env(environ: Mapping[str, str] = os.environ) -> bool:
  """Calls ``jax.distributed.initialize`` when ``environ`` sets any of ``ENVIRONMENT``, before
  anything touches the devices; returns whether it did."""
  if not any(environ.get(name) for name in ENVIRONMENT):
    return False

  def number(name: str) -> int | None:
    value = environ.get(name)
    if value and not value.isdigit():
      raise ValueError(f"{name}={value!r}: expected a non-negative integer")
    return int(value) if value else None

  jax.distributed.initialize(
      coordinator_address=environ.get("JAX_COORDINATOR_ADDRESS") or None,
      num_processes=number("JAX_NUM_PROCESSES"),
      process_id=number("JAX_PROCESS_ID"),
  )
  return True


def writes_files() -> bool:
  """Whether this process writes the run's own files (config.yaml, metrics.jsonl,
  summary.json): process 0 only. Orbax checkpoints are written by all processes together."""
  return jax.process_index() == 0


def host_array(x) -> np.ndarray:
  """The whole value of ``x`` as a NumPy array in every process. For an array that spans several
  processes this is a collective: every process must call it."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
