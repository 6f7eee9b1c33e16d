"""Training methods beside EPI: LoRA adapters (``methods.lora``) and the EWC penalty (``methods.ewc``)."""
