"""The AdamW of a run on its warm-up + cosine schedule; each method (epi_jax.train.methods)
wraps or chains it."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from epi_jax.train.config import Config


def float32_params(model: nnx.Module) -> dict:
  """``jax.ShapeDtypeStruct``s of ``model``'s parameters in float32, as its optimizer sees them:
  gradients and optimizer state are float32 whatever the parameters' dtype (make_optimizer)."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)


def learning_rate(
    config: Config, stage_steps: int | Sequence[int], *, peak: float | None = None
) -> optax.Schedule:
  """Linear warm-up over ``optim.warmup_ratio`` of the steps, then cosine decay to the end:
  once over all stages (``optim.schedule: run``) or restarted at each stage's first step
  (``stage``).

  ``stage_steps``: each stage's optimizer steps (an int: one stage). ``peak``: the peak rate (a
  method's own, e.g. ``method.lora.lr``); None: ``optim.lr``.
  """
  o = config.optim
  peak = o.lr if peak is None else peak
  lengths = [stage_steps] if isinstance(stage_steps, int) else list(stage_steps)
  if o.schedule == "run":
    lengths = [sum(lengths)]

  def cosine(steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=round(o.warmup_ratio * steps),
        decay_steps=max(steps, 1),
        end_value=peak * o.end_lr_ratio,
    )

  if len(lengths) == 1:
    return cosine(lengths[0])
  return optax.join_schedules(
      [cosine(n) for n in lengths], list(itertools.accumulate(lengths[:-1]))
  )


def inner_optimizer(
    config: Config, stage_steps: int | Sequence[int], *, peak: float | None = None
) -> optax.GradientTransformation:
  """Gradient clipping (if any) then AdamW on the schedule of ``learning_rate``."""
  o = config.optim
  adamw = optax.adamw(
      learning_rate(config, stage_steps, peak=peak),
      b1=o.b1,
      b2=o.b2,
      eps=o.eps,
      weight_decay=o.weight_decay,
  )
  return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm else adamw
