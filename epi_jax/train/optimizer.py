"""The AdamW of a run on its warm-up + cosine schedule; each method (epi_jax.train.methods)
wraps or chains it."""

from __future__ import annotations

import optax

from epi_jax.train.config import Config


def learning_rate(config: Config, total_steps: int, *, peak: float | None = None) -> optax.Schedule:
  """Linear warm-up over ``optim.warmup_ratio`` of all steps, then cosine decay to the end.

  ``peak``: the peak rate (a method's own, e.g. ``method.lora.lr``); None: ``optim.lr``.
  """
  o = config.optim
  peak = o.lr if peak is None else peak
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=round(o.warmup_ratio * total_steps),
      decay_steps=max(total_steps, 1),
      end_value=peak * o.end_lr_ratio,
  )


def inner_optimizer(
    config: Config, total_steps: int, *, peak: float | None = None
) -> optax.GradientTransformation:
  """Gradient clipping (if any) then AdamW on the schedule of ``learning_rate``."""
  o = config.optim
  adamw = optax.adamw(
      learning_rate(config, total_steps, peak=peak),
      b1=o.b1,
      b2=o.b2,
      eps=o.eps,
      weight_decay=o.weight_decay,
  )
  return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm else adamw
