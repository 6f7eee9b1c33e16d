"""The run's metrics writer: one JSON object per line in ``metrics.jsonl`` and TensorBoard scalars,
written by process 0 of a multi-process run."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from epi_jax.train.distributed import writes_files


def _plain(value):
  """JSON-ready scalars and lists from numpy/JAX values."""
  array = np.asarray(value)
  return array.item() if array.ndim == 0 else array.tolist()


class MetricsWriter:
  """Appends records to ``<run_dir>/metrics.jsonl`` and, optionally, TensorBoard events.

  A record is ``{"kind": ..., "step": ..., **values}``; array values (per-group mask counts)
  become one TensorBoard scalar per entry, named by ``group_names``. In a process other than the
  first, ``write`` only returns the record.
  """

  def __init__(self, run_dir: str, *, tensorboard: bool, group_names: Sequence[str] = ()):
    self.file = (
        open(os.path.join(run_dir, "metrics.jsonl"), "a")  # noqa: SIM115 (closed by close())
        if writes_files()
        else None
    )
    self.group_names = list(group_names)
    self.tb = None
    if tensorboard and self.file is not None:
      from tensorboardX import SummaryWriter  # imported only when event files are wanted

      self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

  def write(self, kind: str, step: int, values: Mapping) -> dict:
    """Logs ``values`` at ``step`` under ``kind`` (train, eval, mask, stage); returns the record."""
    record = {"kind": kind, "step": int(step)} | {k: _plain(v) for k, v in values.items()}
    if self.file is None:
      return record
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    if self.tb is not None:
      for key, value in record.items():
        if key in ("kind", "step") or value is None or isinstance(value, str):
          continue
        if isinstance(value, list):
          names = self.group_names if len(value) == len(self.group_names) else range(len(value))
          for name, v in zip(names, value):
            self.tb.add_scalar(f"{kind}/{key}/{name}", v, step)
        else:
          self.tb.add_scalar(f"{kind}/{key}", value, step)
      self.tb.flush()
    return record

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
    if self.tb is not None:
      self.tb.close()
