"""Orbax checkpoints of a run: the (model, optimizer) state, JSON metadata and mask history.

Layout: ``<run_dir>/checkpoints/<step>/`` with three items: ``state`` (parameters and the
whole optimizer state: Adam moments, EPI sensitivity, mask, counters), ``meta`` (JSON: step,
stage, data iterator position, seed, config, accuracy rows so far, refresh statistics, wall
time) and, with ``checkpoint.mask_history: full``, ``masks`` (per refresh ``refresh_<step>``,
the np.packbits-packed mask of every parameter along its last axis).
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class RunCheckpoints:
  """Saves and restores complete checkpoints under ``<run_dir>/checkpoints``."""

  def __init__(self, run_dir: str, *, keep: int):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(run_dir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    """Step of the newest finished checkpoint (orbax only lists finalized ones)."""
    return self.manager.latest_step()

  def meta(self, step: int) -> dict:
    """The JSON metadata of checkpoint `step` alone."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def save(self, step: int, state, meta: dict, masks: dict | None) -> None:
    """Writes checkpoint `step`; `masks` (the full mask history) is skipped when empty."""
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if masks:
      items["masks"] = ocp.args.StandardSave(masks)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state, *, with_masks: bool):
    """(state shaped and sharded like `abstract_state`, meta, masks) of `step`; masks is {}
    when the checkpoint holds none and None unless `with_masks`."""
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    stored = os.path.isdir(os.path.join(str(self.manager.directory), str(step), "masks"))
    if with_masks and stored:
      items["masks"] = ocp.args.StandardRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"], out["meta"], (dict(out["masks"]) if stored else {}) if with_masks else None

  def close(self) -> None:
    self.manager.close()


def params_sha256(params) -> str:
  """SHA-256 over every parameter's path, dtype, shape and bytes: equal iff bit-identical."""
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                           key=lambda item: jax.tree_util.keystr(item[0])):
    array = np.asarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()
