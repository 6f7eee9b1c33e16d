"""LoRA as a method of the trainer: the base Decoder frozen, adapters (``epi_jax.methods.lora``)
trained with AdamW, evaluated (and saved to ``<run_dir>/model``) as the adapted model, saved
as a PEFT adapter too."""

from __future__ import annotations

import os

import jax
from flax import nnx, traverse_util

from epi_jax.methods import lora
from epi_jax.models import Decoder
from epi_jax.train.methods.base import Method, Run, Trainable
from epi_jax.train.optimizer import inner_optimizer


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
    tx = inner_optimizer(self.config, run.total_steps, peak=self.peak_learning_rate())
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
    lora.save_adapter(
        module.base,
        module.adapter_values(),
        module.config,
        os.path.join(run_dir, "adapter"),
        base_model_name_or_path=self.config.model.checkpoint or None,
    )
