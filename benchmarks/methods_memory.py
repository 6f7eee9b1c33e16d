"""Extra memory of LoRA and EWC per base-model parameter, and a check of LoRA's estimate against
XLA's own memory analysis.

Part 1 reads shapes only (abstract bfloat16 models, nothing allocated): bytes per base
parameter that ``train.methods.lora.memory_bytes`` and ``train.methods.ewc.memory_bytes`` add for the presets.
Part 2 compiles the adapter gradient of a 4-layer float32 model (D=512, F=1024) and compares
the temporary bytes XLA's CPU backend reports, minus those of a plain forward pass, with the
estimate.

    python benchmarks/methods_memory.py
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from epi_jax.models import lora
from epi_jax.train.methods import ewc as ewc_method
from epi_jax.train.methods import lora as lora_method
from epi_jax.models import Decoder, ModelConfig
from epi_jax.models.loss import response_loss


def per_parameter_table() -> None:
  print(
      "| model | layout | LoRA r=16: adapters+grads+Adam | effective W + grad | LoRA total "
      "| EWC kept (F + anchor) | EWC Fisher pass, 1 example/chunk |"
  )
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for preset in ("smollm2_135m", "llama3_8b"):
    for scan in (False, True):
      config = dataclasses.replace(getattr(ModelConfig, preset)(), scan_layers=scan)
      model = nnx.eval_shape(lambda c=config: Decoder(c, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
      m = lora_method.memory_bytes(model, lora.LoraConfig(rank=16, alpha=32))
      e = ewc_method.memory_bytes(model, examples_per_chunk=1)
      n = m.base_parameters
      print(
          f"| {preset} (bf16) | {'scanned' if scan else 'unscanned'} "
          f"| {(m.adapters + m.adapter_grads + m.adapter_adam) / n:.3f} "
          f"| {(m.effective_weights + m.effective_weight_grads) / n:.3f} "
          f"| {m.per_base_parameter:.3f} | {e.per_base_parameter:.1f} "
          f"| {e.fisher_pass / n:.1f} |"
      )


def measured_against_estimate() -> None:
  print("\n| layout | XLA temp, LoRA grad - forward (MB) | estimate (MB) | targets (MB) |")
  print("| --- | --- | --- | --- |")
  for scan in (False, True):
    config = ModelConfig.tiny(
        "llama",
        hidden_size=512,
        intermediate_size=1024,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        vocab_size=256,
    )
    model = Decoder(dataclasses.replace(config, scan_layers=scan), rngs=nnx.Rngs(0))
    lora_config = lora.LoraConfig(rank=4)
    adapters = lora.init_adapters(model, lora_config, key=jax.random.key(0))
    batch = {
        "input_ids": jnp.ones((1, 8), jnp.int32),
        "loss_mask": jnp.ones((1, 8)),
        "segment_ids": jnp.ones((1, 8), jnp.int32),
        "positions": jnp.arange(8)[None],
    }
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def adapted_loss(adapters, params):
      base = nnx.merge(graphdef, params, rest)
      return response_loss(lora.adapted(base, adapters, lora_config), batch)[0]

    def base_loss(params):
      return response_loss(nnx.merge(graphdef, params, rest), batch)[0]

    temp = lambda fn, *args: jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes
    measured = temp(jax.grad(adapted_loss), adapters, params) - temp(base_loss, params)
    m = lora_method.memory_bytes(model, lora_config)
    print(
        f"| {'scanned' if scan else 'unscanned'} | {measured / 1e6:.1f} "
        f"| {(m.effective_weights + m.effective_weight_grads) / 1e6:.1f} "
        f"| {m.effective_weights / 1e6:.1f} |"
    )


if __name__ == "__main__":
  per_parameter_table()
  measured_against_estimate()
