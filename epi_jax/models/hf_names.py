"""Per-family tables from Hugging Face tensor names to Decoder parameter paths.

Each row is (Hugging Face name, parameter path, layout); ``{i}`` stands for the block index. The
layout says how the Hugging Face tensor is laid out in terms of our axes: Hugging Face axis j
is our axes layout[j] merged in that order (None: the same layout). Hugging Face keeps linear
weights as [out, in]; we keep [in, out] with separate head axes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

Layout = tuple[tuple[int, ...], ...] | None

TRANSPOSE: Layout = ((1,), (0,))  # [out, in] <-> [in, out]
HEADS_IN: Layout = ((1, 2), (0,))  # [N*Dh, D] <-> [D, N, Dh]  (q, k, v projections)
HEADS_OUT: Layout = ((2,), (0, 1))  # [D, H*Dh] <-> [H, Dh, D]  (output projection)
HEADS_BIAS: Layout = ((0, 1),)  # [N*Dh] <-> [N, Dh]

Row = tuple[str, str, Layout]

_SHARED: tuple[Row, ...] = (
    ("model.embed_tokens.weight", "embed", None),
    ("model.norm.weight", "final_norm/scale", None),
    ("lm_head.weight", "lm_head", TRANSPOSE),
    ("model.layers.{i}.input_layernorm.weight", "layers/{i}/attn_norm/scale", None),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers/{i}/attn/q", HEADS_IN),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers/{i}/attn/k", HEADS_IN),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers/{i}/attn/v", HEADS_IN),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers/{i}/attn/o", HEADS_OUT),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers/{i}/attn/q_bias", HEADS_BIAS),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers/{i}/attn/k_bias", HEADS_BIAS),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers/{i}/attn/v_bias", HEADS_BIAS),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers/{i}/mlp/gate", TRANSPOSE),
    ("model.layers.{i}.mlp.up_proj.weight", "layers/{i}/mlp/up", TRANSPOSE),
    ("model.layers.{i}.mlp.down_proj.weight", "layers/{i}/mlp/down", TRANSPOSE),
)

# LLaMA, Mistral and Qwen2 name the pre-MLP norm "post_attention_layernorm".
_PRE_NORM: tuple[Row, ...] = (
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/{i}/mlp_norm/scale", None),
)

# Gemma-2 norms both sides of attention and of the MLP.
_SANDWICH_NORMS: tuple[Row, ...] = (
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/{i}/post_attn_norm/scale", None),
    ("model.layers.{i}.pre_feedforward_layernorm.weight", "layers/{i}/mlp_norm/scale", None),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "layers/{i}/post_mlp_norm/scale", None),
)

TABLES: dict[str, tuple[Row, ...]] = {
    "llama": _SHARED + _PRE_NORM,
    "mistral": _SHARED + _PRE_NORM,
    "qwen2": _SHARED + _PRE_NORM,
    "gemma2": _SHARED + _SANDWICH_NORMS,
}

# Buffers that some older checkpoints store and the decoder recomputes.
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


def _pattern(template: str) -> re.Pattern[str]:
  return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


class NameMap:
  """Both directions of one family's table."""

  def __init__(self, family: str):
    self._rows = [(_pattern(hf), hf, ours, layout) for hf, ours, layout in TABLES[family]]
    self._ours = [(_pattern(ours), hf, layout) for _, hf, ours, layout in self._rows]

  def to_ours(self, hf_name: str) -> tuple[str, Layout] | None:
    """(parameter path, layout) of a Hugging Face name, None when no row matches."""
    for pattern, _, ours, layout in self._rows:
      if m := pattern.match(hf_name):
        return ours.replace("{i}", m.group(1)) if m.groups() else ours, layout
    return None

  def to_hf(self, path: str) -> tuple[str, Layout]:
    """(Hugging Face name, layout) of a parameter path."""
    for pattern, hf, layout in self._ours:
      if m := pattern.match(path):
        return hf.replace("{i}", m.group(1)) if m.groups() else hf, layout
    raise KeyError(f"no Hugging Face name for parameter {path!r}")


def hf_shape(layout: Layout, shape: Sequence[int]) -> tuple[int, ...]:
  """The Hugging Face shape of a parameter of ``shape``."""
  if layout is None:
    return tuple(shape)
  return tuple(math.prod(shape[a] for a in group) for group in layout)


def from_hf_layout(x: np.ndarray, layout: Layout, shape: Sequence[int]) -> np.ndarray:
  """A Hugging Face tensor rearranged to our parameter ``shape``."""
  if layout is None:
    return x
  order = [a for group in layout for a in group]
  return x.reshape([shape[a] for a in order]).transpose(np.argsort(order))


def to_hf_layout(x: np.ndarray, layout: Layout) -> np.ndarray:
  """Our parameter rearranged to the Hugging Face layout."""
  if layout is None:
    return x
  order = [a for group in layout for a in group]
  return np.ascontiguousarray(x.transpose(order).reshape(hf_shape(layout, x.shape)))
