"""Decoder configuration: one frozen dataclass for the llama, mistral, qwen2 and gemma2 families."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from epi_jax.errors import InputError

FAMILIES = ("llama", "mistral", "qwen2", "gemma2")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
# none: keep every activation; block: keep only each block's input and recompute the rest in
# the backward pass; dots: also keep the matmul outputs (recompute only the cheap elementwise ops).
REMAT = ("none", "block", "dots")
SLIDING = "sliding_attention"
FULL = "full_attention"
_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
"""config.json fields every checkpoint needs: positive integers."""
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim")
"""config.json fields that, when given, are positive integers."""


class CheckpointError(InputError, ValueError):
  """A checkpoint (folder, file or its tokenizer) that cannot be used; the message starts
  with the file."""


def read_json(path: str) -> Any:
  """The JSON value of file ``path``.

  Raises:
    CheckpointError: ``path:line: invalid JSON: ...``, or the file cannot be read.
  """
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as error:
    raise CheckpointError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None
  except (OSError, UnicodeDecodeError) as error:
    raise CheckpointError(f"{path}: cannot read: {error}") from None


@dataclasses.dataclass(frozen=True, slots=True)
class Llama3RopeScaling:
  """The ``llama3`` frequency scaling of LLaMA-3.1+ rotary embeddings."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
  """Shapes and per-family switches of the decoder (hashable: it is static under ``jit``)."""

  family: str
  """One of FAMILIES; selects the weight-name table and the config.json layout."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10_000.0
  rope_scaling: Llama3RopeScaling | None = None
  """None for plain rotary embeddings."""
  max_position_embeddings: int = 8192
  attention_bias: bool = False
  """Biases on the q, k, v projections (Qwen2)."""
  sliding_window: int | None = None
  """A query sees itself and the ``sliding_window - 1`` keys before it on sliding layers."""
  layer_types: tuple[str, ...] = ()
  """Per layer "sliding_attention" or "full_attention"; empty means all full."""
  activation: str = "silu"
  """"silu" (SwiGLU) or "gelu_tanh" (GeGLU)."""
  norm_unit_offset: bool = False
  """RMSNorm scales by (1 + w) as in Gemma, else by w."""
  sandwich_norms: bool = False
  """Extra norms after attention and after the MLP (Gemma-2)."""
  scale_embeddings: bool = False
  """Multiply embeddings by sqrt(hidden_size) (Gemma)."""
  query_pre_attn_scalar: int | None = None
  """Attention scale is query_pre_attn_scalar**-0.5; None means head_dim."""
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  scan_layers: bool = False
  """Keep the blocks stacked (parameters ``layers/...`` with a leading layer axis) and run them
    in one ``lax.scan``: compile time no longer grows with depth. Not part of config.json."""
  remat: str = "none"
  """Activation rematerialization per block: one of REMAT. Not part of config.json."""
  compute_dtype: str | None = None
  """Dtype the forward and backward run in ("float32" or "bfloat16"): each parameter is cast to
    it where used and activations carry it; norm statistics, softmax, logits and the loss stay
    float32. None: the parameters' own dtype. Not part of config.json."""

  def __post_init__(self):
    problems = []
    if self.remat not in REMAT:
      problems.append(f"remat={self.remat!r} is not one of {REMAT}")
    if self.compute_dtype not in (None, "float32", "bfloat16"):
      problems.append(f"compute_dtype={self.compute_dtype!r} is not 'float32' or 'bfloat16'")
    if self.family not in FAMILIES:
      problems.append(f"family={self.family!r} is not one of {FAMILIES}")
    if self.activation not in ("silu", "gelu_tanh"):
      problems.append(f"activation={self.activation!r} is not 'silu' or 'gelu_tanh'")
    if self.num_heads % self.num_kv_heads:
      problems.append(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
      )
    if self.layer_types and len(self.layer_types) != self.num_layers:
      problems.append(
          f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
      )
    if set(self.layer_types) - {SLIDING, FULL}:
      problems.append(f"layer_types may only hold {SLIDING!r} and {FULL!r}")
    if SLIDING in self.layer_types and not self.sliding_window:
      problems.append("sliding layers need a positive sliding_window")
    if problems:
      raise ValueError("Invalid ModelConfig: " + "; ".join(problems))

  def window(self, layer: int) -> int | None:
    """The sliding window of ``layer``, or None when it attends to all previous tokens."""
    if self.layer_types and self.layer_types[layer] == SLIDING:
      return self.sliding_window
    return None

  @property
  def attn_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @property
  def eos_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

  # Presets: the paper's four backbones with their Hugging Face shapes, and a tiny CPU model.

  @classmethod
  def llama3_8b(cls) -> ModelConfig:
    """meta-llama/Meta-Llama-3-8B."""
    return cls(
        family="llama",
        vocab_size=128_256,
        hidden_size=4096,
        intermediate_size=14_336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500_000.0,
        max_position_embeddings=8192,
        bos_token_id=128_000,
        eos_token_id=128_001,
    )

  @classmethod
  def llama3_1_8b(cls) -> ModelConfig:
    """meta-llama/Llama-3.1-8B: LLaMA-3-8B shapes with ``llama3`` rope scaling."""
    return dataclasses.replace(
        cls.llama3_8b(), rope_scaling=Llama3RopeScaling(), max_position_embeddings=131_072
    )

  @classmethod
  def mistral_7b(cls) -> ModelConfig:
    """mistralai/Mistral-7B-v0.1 (4096-token sliding window on every layer)."""
    return cls(
        family="mistral",
        vocab_size=32_000,
        hidden_size=4096,
        intermediate_size=14_336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        max_position_embeddings=32_768,
        sliding_window=4096,
        layer_types=(SLIDING,) * 32,
        bos_token_id=1,
        eos_token_id=2,
    )

  @classmethod
  def qwen2_7b(cls) -> ModelConfig:
    """Qwen/Qwen2-7B."""
    return cls(
        family="qwen2",
        vocab_size=152_064,
        hidden_size=3584,
        intermediate_size=18_944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rope_theta=1_000_000.0,
        max_position_embeddings=131_072,
        attention_bias=True,
        bos_token_id=151_643,
        eos_token_id=151_643,
    )

  @classmethod
  def gemma2_9b(cls) -> ModelConfig:
    """google/gemma-2-9b (sliding window on even layers, soft-capping, tied embeddings)."""
    return cls(
        family="gemma2",
        **_gemma2_switches(42),
        vocab_size=256_000,
        hidden_size=3584,
        intermediate_size=14_336,
        num_layers=42,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )

  @classmethod
  def smollm2_135m(cls) -> ModelConfig:
    """HuggingFaceTB/SmolLM2-135M(-Instruct): 30 blocks, tied embeddings, 134.5M parameters."""
    return cls(
        family="llama",
        vocab_size=49_152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100_000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )

  @classmethod
  def tiny(cls, family: str = "llama", **overrides: Any) -> ModelConfig:
    """A 2-layer, 64-wide model of ``family`` for CPU tests and demos (vocab fits a byte tokenizer)."""
    fields = dict(
        family=family,
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "mistral":
      fields.update(sliding_window=8, layer_types=(SLIDING,) * 2)
    elif family == "qwen2":
      fields.update(attention_bias=True)
    elif family == "gemma2":
      fields.update(
          _gemma2_switches(2), sliding_window=8, query_pre_attn_scalar=16, tie_word_embeddings=True
      )
    return cls(**(fields | overrides))

  # Hugging Face config.json.

  @classmethod
  def from_hf(cls, source: str | os.PathLike | dict[str, Any]) -> ModelConfig:
    """Reads a Hugging Face config.json (a folder, the file, or its dict) of a supported family.

    Raises:
      CheckpointError: for a file, naming it and what is wrong: unreadable, not JSON, an
        unsupported architecture, a missing or mistyped field.
      ValueError: the same problems of a dict.
    """
    if isinstance(source, dict):
      return cls._from_hf_dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    hf = read_json(path)
    try:
      if not isinstance(hf, dict):
        raise ValueError(f"must hold a JSON object, got {type(hf).__name__}")
      return cls._from_hf_dict(hf)
    except ValueError as error:
      raise CheckpointError(f"{path}: {error}") from None

  @classmethod
  def _from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
    family = hf.get("model_type")
    if family not in FAMILIES:
      raise ValueError(f"model_type={family!r} is not supported; expected one of {FAMILIES}")
    bad = [
        f"field {key!r} must be a positive integer, got {hf[key]!r}"
        if key in hf
        else f"missing field {key!r}"
        for key in _SIZES + _OPTIONAL_SIZES
        if (key in _SIZES or hf.get(key) is not None)
        and (not isinstance(hf.get(key), int) or isinstance(hf.get(key), bool) or hf[key] < 1)
    ]
    if bad:
      raise ValueError("; ".join(bad))
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if act not in _ACTIVATIONS:
      raise ValueError(
          f"activation {act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}"
      )
    if hf.get("mlp_bias"):
      raise ValueError("mlp_bias=true is not supported")
    heads, layers = hf["num_attention_heads"], hf["num_hidden_layers"]
    rope = hf.get("rope_parameters") or dict(
        hf.get("rope_scaling") or {}, rope_theta=hf.get("rope_theta", 10_000.0)
    )
    eos = hf.get("eos_token_id")
    fields: dict[str, Any] = dict(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", 10_000.0)),
        rope_scaling=_rope_scaling(rope),
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        attention_bias=family == "qwen2" or bool(hf.get("attention_bias")),
        activation=_ACTIVATIONS[act],
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
    )
    window = hf.get("sliding_window")
    if family == "mistral" and window:
      fields.update(sliding_window=window, layer_types=(SLIDING,) * layers)
    elif family == "qwen2" and hf.get("use_sliding_window") and window:
      first = hf.get("max_window_layers", layers)
      types = hf.get("layer_types") or [SLIDING if i >= first else FULL for i in range(layers)]
      fields.update(sliding_window=window, layer_types=tuple(types))
    elif family == "gemma2":
      fields.update(
          _gemma2_switches(layers),
          sliding_window=window,
          query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
          attn_logit_softcap=hf.get("attn_logit_softcapping"),
          final_logit_softcap=hf.get("final_logit_softcapping"),
      )
      if hf.get("layer_types"):
        fields["layer_types"] = tuple(hf["layer_types"])
    fields["tie_word_embeddings"] = hf.get("tie_word_embeddings", family == "gemma2")
    return cls(**fields)

  def to_hf(self) -> dict[str, Any]:
    """The config.json dict that transformers' ``AutoConfig`` reads back as this model."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling is not None:
      rope = dict(
          dataclasses.asdict(self.rope_scaling), rope_type="llama3", rope_theta=self.rope_theta
      )
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    hf: dict[str, Any] = {
        "model_type": self.family,
        "architectures": [_ARCHITECTURES[self.family]],
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_parameters": rope,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": self.pad_token_id,
    }
    act = "gelu_pytorch_tanh" if self.activation == "gelu_tanh" else "silu"
    if self.family == "gemma2":
      hf.update(
          hidden_activation=act,
          query_pre_attn_scalar=self.query_pre_attn_scalar,
          attn_logit_softcapping=self.attn_logit_softcap,
          final_logit_softcapping=self.final_logit_softcap,
          sliding_window=self.sliding_window,
          layer_types=list(self.layer_types),
      )
    else:
      hf["hidden_act"] = act
    if self.family == "llama":
      hf["attention_bias"] = self.attention_bias
    elif self.family == "mistral":
      hf["sliding_window"] = self.sliding_window
    elif self.family == "qwen2":
      hf.update(
          use_sliding_window=self.sliding_window is not None,
          sliding_window=self.sliding_window,
          layer_types=list(self.layer_types) or [FULL] * self.num_layers,
      )
    return hf


def _gemma2_switches(num_layers: int) -> dict[str, Any]:
  """Gemma-2's fixed switches; layers 0, 2, 4, ... use the sliding window."""
  return dict(
      activation="gelu_tanh",
      norm_unit_offset=True,
      sandwich_norms=True,
      scale_embeddings=True,
      attn_logit_softcap=50.0,
      final_logit_softcap=30.0,
      layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers)),
  )


def _rope_scaling(rope: dict[str, Any]) -> Llama3RopeScaling | None:
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return None
  if kind != "llama3":
    raise ValueError(f"rope_type={kind!r} is not supported; expected 'default' or 'llama3'")
  return Llama3RopeScaling(
      factor=float(rope["factor"]),
      low_freq_factor=float(rope["low_freq_factor"]),
      high_freq_factor=float(rope["high_freq_factor"]),
      original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
  )
