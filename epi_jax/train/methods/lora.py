"""LoRA as a method of the trainer: the base Decoder frozen, adapters (``epi_jax.models.lora``)
trained with AdamW, evaluated (and saved to ``<run_dir>/model``) as the adapted model, saved
as a PEFT adapter too (``epi_jax.models.lora_peft``); ``memory_bytes`` for the dry-run plan."""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from epi_jax.models import lora, lora_peft
from epi_jax.models import Decoder
from epi_jax.train.methods.base import (
    EXTRA_MEMORY_HEADER,
    GIB,
    Method,
    Run,
    Trainable,
    extra_memory_line,
)
from epi_jax.train.optimizer import inner_optimizer


class LoraMemory(NamedTuple):
  """Bytes LoRA adds to a training step (whole model, before sharding), and its savings."""

  adapter_parameters: int  # entries of all a and b
  adapters: int  # a and b
  adapter_grads: int  # their gradients
  adapter_adam: int  # Adam mu and nu of the adapters
  effective_weights: int  # W + (alpha/r) a @ b of every target, live through the step
  effective_weight_grads: int  # gradient w.r.t. those weights before it reaches a and b (est.)
  base_parameters: int  # entries of the base model

  @property
  def total(self) -> int:
    return (
        self.adapters
        + self.adapter_grads
        + self.adapter_adam
        + self.effective_weights
        + self.effective_weight_grads
    )

  @property
  def per_base_parameter(self) -> float:
    """Extra bytes per parameter of the base model."""
    return self.total / self.base_parameters


def memory_bytes(model: Decoder, config: lora.LoraConfig, *, dtype=jnp.float32) -> LoraMemory:
  """The extra memory of LoRA training for the dry-run plan, from shapes only (an abstract
  model from ``nnx.eval_shape`` works).

  The base model itself is not counted; LoRA gives it no gradient and no optimizer state.
  The effective weights (one copy of the targets in the base dtype) live from the forward to
  the backward pass. Their gradient is one full copy of the targets with ``scan_layers`` (the
  scan's backward returns it stacked), otherwise one target kernel at a time, each freed once
  its a and b gradients are formed. XLA's CPU memory analysis of a 4-layer model
  (docs/methods.md) measures +1.04x the targets unscanned (this estimate: 1.05x) and +2.4x
  scanned (this estimate: 2x).
  """
  targets = lora.find_targets(model, config)
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  count = sum(math.prod(s) for t in targets for s in t.adapter_shapes(config.rank))
  itemsize = jnp.dtype(dtype).itemsize
  kernel_bytes = [math.prod(t.shape) * jnp.dtype(params[t.path].dtype).itemsize for t in targets]
  scanned = targets[0].lead > 0
  return LoraMemory(
      adapter_parameters=count,
      adapters=count * itemsize,
      adapter_grads=count * itemsize,
      adapter_adam=2 * count * itemsize,
      effective_weights=sum(kernel_bytes),
      effective_weight_grads=sum(kernel_bytes) if scanned else max(kernel_bytes),
      base_parameters=sum(math.prod(v.shape) for v in params.values()),
  )


class LoraParam(nnx.Param):
  """An adapter matrix: the only variables a LoRA run trains (and keeps Adam state for)."""


class LoraModel(nnx.Module):
  """A Decoder plus adapters, called like the Decoder; only the adapters get gradients."""

  def __init__(self, base: Decoder, adapters: dict, config: lora.LoraConfig, *, seed: int):
    self.base = base
    self.config = config
    names = traverse_util.flatten_dict(lora.adapter_axis_names(base, config))
    self.adapters = nnx.data(
        traverse_util.unflatten_dict(
            {
                key: LoraParam(value, out_sharding=names[key], eager_sharding=False)
                for key, value in traverse_util.flatten_dict(adapters).items()
            }
        )
    )
    self.rngs = nnx.Rngs(dropout=seed)

  def adapter_values(self) -> dict:
    return jax.tree.map(
        lambda v: v.get_value(), self.adapters, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )

  def adapted(self) -> Decoder:
    """The base with the adapters added (dropout keys drawn from ``self.rngs``)."""
    key = self.rngs.dropout() if self.config.dropout > 0 else None
    return lora.adapted(self.base, self.adapter_values(), self.config, dropout_key=key)

  def __call__(self, input_ids, attention_mask=None, **kwargs):
    return self.adapted()(input_ids, attention_mask, **kwargs)

  def hidden_states(self, input_ids, attention_mask=None, **kwargs):
    return self.adapted().hidden_states(input_ids, attention_mask, **kwargs)

  def logits(self, x):
    return self.base.logits(x)  # LoRA adapts block kernels only: the head is the base's


class LoRA(Method):
  """Adapters of rank ``method.lora.rank`` on ``method.lora.targets``; the base stays fixed."""

  def lora_config(self) -> lora.LoraConfig:
    c = self.config.method.lora
    return lora.LoraConfig(rank=c.rank, alpha=c.alpha, dropout=c.dropout, targets=tuple(c.targets))

  def problems(self) -> list[str]:
    try:
      self.lora_config()
    except ValueError as error:
      return [f"method.lora: {error}"]
    return []

  def peak_learning_rate(self) -> float:
    """``method.lora.lr``, or ``optim.lr`` when it is 0 (unset)."""
    return self.config.method.lora.lr or self.config.optim.lr

  def trainable(self, model: Decoder, run: Run) -> Trainable:
    config, seed = self.lora_config(), self.config.train.seed
    adapters = lora.init_adapters(model, config, key=jax.random.key(seed), mesh=run.mesh)
    module = LoraModel(model, adapters, config, seed=seed)
    tx = inner_optimizer(self.config, run.stage_steps, peak=self.peak_learning_rate())
    return Trainable(module, tx, wrt=LoraParam)

  def eval_model(self, module: LoraModel) -> Decoder:
    return lora.adapted(module.base, module.adapter_values(), module.config)

  def summary(self, module: LoraModel, optimizer: nnx.Optimizer) -> dict:
    trained = sum(x.size for x in jax.tree.leaves(module.adapter_values()))
    base = sum(x.size for x in jax.tree.leaves(nnx.state(module.base, nnx.Param)))
    return {"lora": {"adapter_parameters": trained, "fraction_of_base": trained / base}}

  def export(self, module: LoraModel, run_dir: str) -> None:
    """The adapter alone in PEFT's format (``<run_dir>/adapter``); the merged model goes to
    ``<run_dir>/model`` as every method's (``eval_model``, ``train.export``)."""
    lora_peft.save_adapter(
        module.base,
        module.adapter_values(),
        module.config,
        os.path.join(run_dir, "adapter"),
        base_model_name_or_path=self.config.model.checkpoint or None,
    )

  def memory_plan(self, model: Decoder, plan: dict, fraction: float) -> dict:
    """The adapters' extra bytes (``memory_bytes``); the base needs no gradient and no Adam
    moments."""
    low_rank = memory_bytes(model, self.lora_config())
    return {
        "extra_bytes_per_param": low_rank.per_base_parameter,
        "extra_gib": low_rank.total * fraction / GIB,
        "total_gib": plan["params_gib"] + plan["activations_gib"] + low_rank.total * fraction / GIB,
    }

  def memory_table(self, rows: dict) -> tuple[str, list[str]]:
    label = f"lora (rank {self.config.method.lora.rank})"
    return EXTRA_MEMORY_HEADER, [extra_memory_line(label, rows, "(no base grads or Adam moments)")]
