"""Deprecated: the former home of LoRA and EWC. The methods live in ``epi_jax.train.methods``;
LoRA's adapter maths in ``epi_jax.models.lora`` and its PEFT files in ``epi_jax.models.lora_peft``;
the EWC penalty in ``epi_jax._src.ewc``. ``methods.lora`` and ``methods.ewc`` re-export their old
names from there."""

import warnings

warnings.warn(
    "epi_jax.methods is deprecated: import epi_jax.models.lora, epi_jax.models.lora_peft, "
    "epi_jax.train.methods.lora or epi_jax.train.methods.ewc instead",
    DeprecationWarning,
    stacklevel=2,
)
