"""The optax transformation of a run: AdamW on a warm-up + cosine schedule, wrapped by the
method's isolation (EPI, or a fixed static mask)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

import epi_jax
from epi_jax.train.config import Config


def learning_rate(config: Config, total_steps: int) -> optax.Schedule:
  """Linear warm-up over `optim.warmup_ratio` of all steps, then cosine decay to the end."""
  o = config.optim
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=round(o.warmup_ratio * total_steps),
      decay_steps=max(total_steps, 1), end_value=o.lr * o.end_lr_ratio)


def inner_optimizer(config: Config, total_steps: int) -> optax.GradientTransformation:
  """Gradient clipping (if any) then AdamW on the schedule."""
  o = config.optim
  adamw = optax.adamw(learning_rate(config, total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=o.weight_decay)
  return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm else adamw


def make_optimizer(config: Config, total_steps: int, static_mask=None
                   ) -> optax.GradientTransformation:
  """The method's transformation; `static_mask` (True = frozen) is required by `static`."""
  m, inner = config.method, inner_optimizer(config, total_steps)
  if m.type == "epi":
    return epi_jax.epi(inner, p=m.p, beta=m.beta, interval=m.interval, normalize=m.normalize,
                       budget=m.budget, layer_of=m.layer_of, sensitivity=m.sensitivity,
                       sensitivity_dtype=jnp.dtype(m.sensitivity_dtype))
  if m.type == "static":
    if static_mask is None:
      raise ValueError("method static needs the probe mask")
    return epi_jax.static_isolation(inner, static_mask)
  return inner
