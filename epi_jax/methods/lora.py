"""Deprecated alias of LoRA's former module: the adapter maths from ``epi_jax.models.lora``, the
PEFT files from ``epi_jax.models.lora_peft``, the memory estimate from
``epi_jax.train.methods.lora``."""

from epi_jax.models.lora import (
    TARGETS,
    LoraConfig,
    adapted,
    adapter_axis_names,
    adapter_shardings,
    init_adapters,
    merge,
)
from epi_jax.models.lora_peft import (
    CONFIG_FILE,
    PEFT_PREFIX,
    PEFT_VERSION,
    WEIGHTS_FILE,
    load_adapter,
    peft_config,
    save_adapter,
)
from epi_jax.train.methods.lora import LoraMemory, memory_bytes

__all__ = [
    "CONFIG_FILE",
    "PEFT_PREFIX",
    "PEFT_VERSION",
    "TARGETS",
    "WEIGHTS_FILE",
    "LoraConfig",
    "LoraMemory",
    "adapted",
    "adapter_axis_names",
    "adapter_shardings",
    "init_adapters",
    "load_adapter",
    "memory_bytes",
    "merge",
    "peft_config",
    "save_adapter",
]
