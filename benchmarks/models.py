"""Prints, per family, the max |logits difference| of the Flax decoder against transformers'
PyTorch model on the same random tiny checkpoint, and the time to load it and run a forward pass.

    .venv/bin/python benchmarks/models.py
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from epi_jax.models import Llama3RopeScaling, ModelConfig, from_pretrained
from epi_jax.models.config import FULL, SLIDING

BATCH, LENGTH = 4, 64

VARIANTS = {
    "llama": ModelConfig.tiny("llama"),
    "llama (llama3 rope)": dataclasses.replace(
        ModelConfig.tiny("llama"),
        rope_theta=500_000.0,
        rope_scaling=Llama3RopeScaling(original_max_position_embeddings=16),
    ),
    "mistral (window 8)": ModelConfig.tiny("mistral"),
    "qwen2 (window 8 on layer 1)": ModelConfig.tiny(
        "qwen2", sliding_window=8, layer_types=(FULL, SLIDING)
    ),
    "gemma2 (window 8 on layer 0)": ModelConfig.tiny("gemma2"),
}


def torch_reference(config: ModelConfig, folder: str) -> transformers.PreTrainedModel:
  """A random PyTorch model built from ``config.to_hf()``, saved to ``folder``."""
  torch.manual_seed(0)
  hf_config = transformers.AutoConfig.for_model(**config.to_hf())
  model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.eval().save_pretrained(folder)
  return model


def measure(name: str, config: ModelConfig) -> str:
  rng = np.random.default_rng(0)
  ids = rng.integers(3, config.vocab_size, (BATCH, LENGTH))
  mask = (np.arange(LENGTH)[None] >= np.array([[0], [7], [20], [40]])).astype(np.int64)
  real = mask.astype(bool)
  with tempfile.TemporaryDirectory() as folder:
    reference = torch_reference(config, folder)
    with torch.no_grad():
      want = reference(
          input_ids=torch.from_numpy(ids),
          attention_mask=torch.from_numpy(mask),
          position_ids=torch.from_numpy(np.maximum(mask.cumsum(-1) - 1, 0)),
      ).logits.numpy()
    row = [name]
    for dtype in (jnp.float32, jnp.bfloat16):
      forward = nnx.jit(lambda model, ids, mask: model(ids, mask))
      start = time.perf_counter()
      model, _ = from_pretrained(folder, dtype=dtype)
      loaded = time.perf_counter()
      got = np.asarray(jax.block_until_ready(forward(model, ids, mask)))
      compiled = time.perf_counter()
      jax.block_until_ready(forward(model, ids, mask))
      again = time.perf_counter()
      row.append(f"{np.abs(got[real] - want[real]).max():.1e}")
      if dtype == jnp.float32:
        row += [
            f"{loaded - start:.3f}",
            f"{compiled - loaded:.2f}",
            f"{1000 * (again - compiled):.1f}",
        ]
  return "| " + " | ".join(row) + " |"


def main() -> None:
  print(
      f"jax {jax.__version__} on {jax.devices()[0].platform}, transformers "
      f"{transformers.__version__}, torch {torch.__version__}; batch {BATCH} x {LENGTH} "
      f"tokens, left padding 0/7/20/40"
  )
  print(
      "| family | max abs diff f32 | load f32 (s) | first forward, with jit compile (s) "
      "| next forward (ms) | max abs diff bf16 |"
  )
  print("| --- | --- | --- | --- | --- | --- |")
  for name, config in VARIANTS.items():
    print(measure(name, config))


if __name__ == "__main__":
  main()
