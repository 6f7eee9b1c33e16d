"""EPI inside tunix's ``PeftTrainer``: ``epi_jax.epi`` is the optax optimizer the trainer takes.

Fine-tunes the tiny ``epi_jax.models.Decoder`` for a few steps on synthetic token rows with
``optimizer=epi_jax.epi(optax.adamw(...), p=..., interval=...)``, records the parameters and
EPI's mask before every step (a ``TrainingHooks``), and checks that the entries protected at each
step kept their values. Needs ``google-tunix`` (``make tunix-env``; docs/integrations.md):

  PYTHONPATH=. .venv-tunix/bin/python examples/tunix_epi.py [--steps 8] [--out trace.npz]
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tunix.sft import hooks, peft_trainer

import epi_jax
from epi_jax.models import Decoder, ModelConfig
from epi_jax.models.loss import response_loss


def synthetic_batches(steps: int, batch: int = 8, length: int = 16, seed: int = 0) -> list[dict]:
  """``steps`` batches of counting sequences (each row starts at a random token), all tokens
  trained: the model can learn them, so the loss falls."""
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(steps):
    start = rng.integers(3, 200, size=(batch, 1))
    ids = (start + np.arange(length)).astype(np.int32)
    ones = np.ones_like(ids)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape)
    batches.append(dict(input_ids=ids, loss_mask=ones, segment_ids=ones, positions=positions))
  return batches


def next_token_loss(model, input_ids, loss_mask, segment_ids, positions) -> jax.Array:
  """Mean next-token cross-entropy; tunix calls ``loss_fn(model, **batch)``."""
  batch = dict(
      input_ids=input_ids, loss_mask=loss_mask, segment_ids=segment_ids, positions=positions
  )
  total, count = response_loss(model, batch)
  return total / jnp.maximum(count, 1.0)


class Recorder(hooks.TrainingHooks):
  """Copies the parameters, EPI's mask and whether it was just refreshed before every step and
  after the last: snapshot t holds the state after t updates (the mask applied at step t)."""

  def __init__(self):
    self.params, self.masks, self.refreshed, self.losses = [], [], [], []

  def _record(self, trainer: peft_trainer.PeftTrainer) -> None:
    state = trainer.optimizer.opt_state
    self.params.append(jax.tree.leaves(jax.device_get(nnx.state(trainer.model, nnx.Param))))
    self.masks.append(jax.tree.leaves(jax.device_get(epi_jax.protection_mask(state))))
    self.refreshed.append(bool(epi_jax.refreshed(state)))

  def on_train_start(self, train_ctx):
    pass

  def on_train_step_start(self, train_ctx):
    self._record(train_ctx)

  def on_train_step_end(self, train_ctx, train_step, train_loss):
    self.losses.append(float(train_loss))

  def on_train_end(self, train_ctx):
    self._record(train_ctx)

  def on_eval_step_start(self, train_ctx):
    pass

  def on_eval_step_end(self, train_ctx, eval_loss):
    pass


def train(steps: int, p: float, interval: int, lr: float, seed: int = 0) -> Recorder:
  """Trains the tiny decoder for ``steps`` updates in tunix's ``PeftTrainer`` with EPI."""
  model = Decoder(ModelConfig.tiny(), rngs=nnx.Rngs(seed))
  tx = epi_jax.epi(optax.adamw(lr, weight_decay=0.01), p=p, interval=interval)
  config = peft_trainer.TrainingConfig(eval_every_n_steps=steps, max_steps=steps)
  trainer = peft_trainer.PeftTrainer(model, tx, config).with_loss_fn(next_token_loss)
  recorder = Recorder()
  trainer.with_training_hooks(recorder)
  trainer.train(synthetic_batches(steps, seed=seed))
  return recorder


def report(recorder: Recorder) -> list[tuple[int, bool, int, int]]:
  """Per step t: (t, refreshed, entries protected, protected entries that moved)."""
  rows = []
  for t in range(1, len(recorder.params)):
    before, after, mask = recorder.params[t - 1], recorder.params[t], recorder.masks[t]
    moved = sum(int(np.sum((a != b) & m)) for a, b, m in zip(after, before, mask))
    rows.append((t, recorder.refreshed[t], sum(int(m.sum()) for m in mask), moved))
  return rows


def save(recorder: Recorder, path: str) -> None:
  """Writes snapshot t's leaves as ``param_t_i`` / ``mask_t_i``, and ``refreshed``, ``loss``."""
  arrays = {"refreshed": np.array(recorder.refreshed), "loss": np.array(recorder.losses)}
  for t, (params, masks) in enumerate(zip(recorder.params, recorder.masks)):
    arrays |= {f"param_{t}_{i}": np.asarray(x) for i, x in enumerate(params)}
    arrays |= {f"mask_{t}_{i}": np.asarray(m) for i, m in enumerate(masks)}
  np.savez(path, **arrays)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--p", type=float, default=0.05, help="protected fraction")
  parser.add_argument("--interval", type=int, default=2, help="H: refresh every H steps")
  parser.add_argument("--lr", type=float, default=1e-2)
  parser.add_argument("--out", help="write the snapshots to this .npz file")
  args = parser.parse_args(argv)
  recorder = train(args.steps, args.p, args.interval, args.lr)
  if args.out:
    save(recorder, args.out)
  rows = report(recorder)
  print("step  refreshed  protected  protected_moved")
  for t, refreshed, protected, moved in rows:
    print(f"{t:4d}  {refreshed!s:>9}  {protected:9d}  {moved:15d}")
  print(f"loss: {recorder.losses[0]:.3f} -> {recorder.losses[-1]:.3f}")
  if any(moved for *_, moved in rows) or not any(protected for _, _, protected, _ in rows):
    print("EPI's mask was not applied inside the trainer", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
