"""Tiny random transformers (PyTorch) models of each family: the reference for the Flax decoder."""

from __future__ import annotations

import numpy as np
import torch
import transformers

WINDOW = 8  # sliding window, shorter than the test sequences
_SHAPES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=300,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500_000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

VARIANTS = {
    "llama": lambda: transformers.LlamaConfig(**_SHAPES),
    "llama3_rope": lambda: transformers.LlamaConfig(**_SHAPES, rope_parameters=_LLAMA3_ROPE),
    "mistral": lambda: transformers.MistralConfig(**_SHAPES, sliding_window=WINDOW),
    "qwen2": lambda: transformers.Qwen2Config(
        **_SHAPES, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
    "gemma2": lambda: transformers.Gemma2Config(
        **_SHAPES, sliding_window=WINDOW, query_pre_attn_scalar=24
    ),
}


def torch_model(variant: str, seed: int = 0) -> transformers.PreTrainedModel:
  """A random eager-attention model; weights (norms and biases included) drawn away from init."""
  torch.manual_seed(seed)
  config = VARIANTS[variant]()
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def left_padded_batch(
    seed: int, batch: int = 3, length: int = 20, pads: tuple[int, ...] = (0, 5, 11)
) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids, attention_mask) int64 [batch, length]; row r has pads[r] leading pad tokens."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, _SHAPES["vocab_size"], (batch, length))
  mask = (np.arange(length)[None, :] >= np.asarray(pads)[:, None]).astype(np.int64)
  return np.where(mask == 1, ids, _SHAPES["pad_token_id"]), mask


def torch_logits(
    model: transformers.PreTrainedModel, ids: np.ndarray, mask: np.ndarray
) -> np.ndarray:
  """Logits with the positions transformers' generate uses: padding skipped."""
  ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
  positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
  with torch.no_grad():
    return model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions).logits.numpy()
