"""Orbax checkpoints of a run: the (model, optimizer) state, its ``RunRecord`` and mask history.

Layout: ``<run_dir>/checkpoints/<step>/`` with three items: ``state`` (parameters and the
whole optimizer state: Adam moments, EPI sensitivity, mask, counters, EWC's Fisher and
anchors), ``meta`` (the ``RunRecord`` as JSON) and, with ``checkpoint.mask_history: full``,
``masks`` (per refresh ``refresh_<step>``, the mask of every parameter as EPI's state packs
it: bits along the last axis when that axis is a multiple of 8, else bool).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from epi_jax.train.distributed import host_array


@dataclasses.dataclass
class RunRecord:
  """Where a run is and what it measured so far: the JSON item of every checkpoint."""

  step: int = 0
  data: dict | None = None  # the iterator position: {"stage", "epoch", "index", "rows"}
  matrix: list = dataclasses.field(default_factory=list)  # headline score rows, one per stage
  eval_metrics: list = dataclasses.field(default_factory=list)  # all metrics, one per stage
  mask_history: list = dataclasses.field(default_factory=list)  # statistics of every refresh
  analyses: dict = dataclasses.field(default_factory=dict)  # what RunAnalyses keeps
  wall_time: float = 0.0  # seconds of all sessions up to this checkpoint
  seed: dict = dataclasses.field(default_factory=dict)
  config: dict = dataclasses.field(default_factory=dict)


class RunCheckpoints:
  """Saves and restores complete checkpoints under ``<run_dir>/checkpoints``."""

  def __init__(self, run_dir: str, *, keep: int):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(run_dir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False),
    )

  def latest_step(self) -> int | None:
    """Step of the newest finished checkpoint (orbax only lists finalized ones)."""
    return self.manager.latest_step()

  def record(self, step: int) -> RunRecord:
    """The record of checkpoint ``step`` alone."""
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return RunRecord(**meta["meta"])

  def save(self, step: int, state, record: RunRecord, masks: dict | None) -> None:
    """Writes checkpoint ``step``; ``masks`` (the full mask history) is skipped when empty."""
    items = {
        "state": ocp.args.StandardSave(state),
        "meta": ocp.args.JsonSave(dataclasses.asdict(record)),
    }
    if masks:
      items["masks"] = ocp.args.StandardSave(masks)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state, *, with_masks: bool):
    """(state shaped and sharded like ``abstract_state``, record, masks) of ``step``; masks is {}
    when the checkpoint holds none and None unless ``with_masks``."""
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    stored = os.path.isdir(os.path.join(str(self.manager.directory), str(step), "masks"))
    if with_masks and stored:
      items["masks"] = ocp.args.StandardRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    masks = (dict(out["masks"]) if stored else {}) if with_masks else None
    return out["state"], RunRecord(**out["meta"]), masks

  def close(self) -> None:
    self.manager.close()


def params_sha256(params) -> str:
  """SHA-256 over every parameter's path, dtype, shape and bytes: equal iff bit-identical.
  With several processes every one must call it (parameters are gathered from all of them)."""
  digest = hashlib.sha256()
  for path, leaf in sorted(
      jax.tree_util.tree_flatten_with_path(params)[0],
      key=lambda item: jax.tree_util.keystr(item[0]),
  ):
    array = host_array(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()
