"""llama.cpp GGUF files as checkpoints: the config from the metadata, the tensors dequantized
under their Hugging Face names and layouts, and the tokenizer. No torch.

Conversions undone here, as in llama.cpp's ``convert_hf_to_gguf.py`` and transformers'
``modeling_gguf_pytorch_utils.py`` (the loader ``from_pretrained(..., gguf_file=...)`` uses for
these architectures):

- tensor names: ``blk.{i}.attn_q.weight`` <- ``model.layers.{i}.self_attn.q_proj.weight``, ...;
- the llama converter permutes the rows of q and k (weights and biases) per head from the
  Hugging Face "two halves" rotary order to interleaved pairs (``LlamaModel.permute``);
- the gemma2 converter stores every RMSNorm weight as ``w + 1`` (``Gemma2Model.modify_tensors``);
- ggml lists dimensions fastest first, so a GGUF shape is the Hugging Face shape reversed.

The config follows llama.cpp's reading of the metadata (``llama-model.cpp``): head_dim is
``attention.key_length``, else hidden / heads; Gemma-2 scales queries by head_dim**-0.5 except
the 46-layer 27B, which uses (hidden / heads)**-0.5; Mistral files use the llama architecture.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import gguf
import numpy as np

from epi_jax.models.config import CheckpointError, ModelConfig

# general.architecture -> family (Mistral files use "llama", as llama.cpp converts them).
FAMILIES = {"llama": "llama", "qwen2": "qwen2", "gemma2": "gemma2"}

_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",  # the pre-MLP norm of llama and qwen2
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCKS = {
    "llama": _BLOCK,
    "qwen2": _BLOCK,
    "gemma2": (
        _BLOCK
        | {
            "ffn_norm": "pre_feedforward_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        }
    ),
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)")


def is_gguf(path: str) -> bool:
  return path.endswith(".gguf")


def read_gguf(path: str) -> gguf.GGUFReader:
  """The reader of GGUF file ``path``.

  Raises:
    CheckpointError: the file is cut short or not GGUF (numpy's errors of the reader).
  """
  try:
    return gguf.GGUFReader(path)
  except (ValueError, OSError) as error:
    raise CheckpointError(f"{path}: not a complete GGUF file ({error})") from None


def hf_name(name: str, family: str) -> str | None:
  """The Hugging Face name of GGUF tensor ``name``, None when the family has no such tensor."""
  module, _, kind = name.rpartition(".")
  if m := _BLOCK_NAME.fullmatch(module):
    sub = _BLOCKS[family].get(m[2])
    return f"model.layers.{m[1]}.{sub}.{kind}" if sub else None
  return f"{_GLOBAL[module]}.{kind}" if module in _GLOBAL else None


def gguf_name(name: str, family: str) -> str:
  """The GGUF name of Hugging Face tensor ``name`` (the inverse of ``hf_name``)."""
  module, _, kind = name.rpartition(".")
  if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module):
    block = {hf: gg for gg, hf in _BLOCKS[family].items()}
    return f"blk.{m[1]}.{block[m[2]]}.{kind}"
  top = {hf: gg for gg, hf in _GLOBAL.items()}
  return f"{top[module]}.{kind}"


@functools.cache
def dequantizable(qtype: gguf.GGMLQuantizationType) -> bool:
  """Whether ``gguf.quants.dequantize`` reads tensors of this type (tried on one zero block)."""
  _, type_size = gguf.GGML_QUANT_SIZES[qtype]
  try:
    gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
  except NotImplementedError:
    return False
  return True


def unpermute_rows(x: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation: per head, rows (pair, half) -> (half, pair)."""
  return x.reshape(heads, -1, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def permute_rows(x: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's q/k row permutation (the inverse of ``unpermute_rows``): per head, rows
  (half, pair) -> (pair, half)."""
  return x.reshape(heads, 2, -1, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


class GGUFSource:
  """A GGUF file as a tensor source: Hugging Face names and shapes first, then tensor by tensor.

  Attributes:
    path: the file.
    config: the decoder it describes, None when ``problems`` prevent building one.
    problems: what is wrong with the file as a whole (architecture, metadata).
    unsupported: "name: TYPE" of every tensor ``gguf.quants`` cannot dequantize.
    shapes: Hugging Face name (the GGUF name when it has none) -> shape, of every tensor.
  """

  def __init__(self, path: str):
    self.path = path
    self._reader = read_gguf(path)
    self.config, self.problems = config_from_metadata(
        self._reader.fields, [t.name for t in self._reader.tensors]
    )
    family = self.config.family if self.config else None
    self._tensors: dict[str, gguf.ReaderTensor] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    self.unsupported: list[str] = []
    for tensor in self._reader.tensors:
      name = (family and hf_name(tensor.name, family)) or tensor.name
      self._tensors[name] = tensor
      self.shapes[name] = tuple(int(d) for d in reversed(tensor.shape))
      if not dequantizable(tensor.tensor_type):
        self.unsupported.append(f"{tensor.name}: {tensor.tensor_type.name}")

  def label(self, name: str) -> str:
    """The GGUF name of tensor ``name`` (present or expected), with ``name`` when it differs."""
    file_name = (
        self._tensors[name].name if name in self._tensors else gguf_name(name, self.config.family)
    )
    return name if file_name == name else f"{file_name} ({name})"

  def read(self, name: str) -> np.ndarray:
    """Tensor ``name`` dequantized to float32, in the Hugging Face layout and values."""
    tensor = self._tensors[name]
    x = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(self.shapes[name])
    config = self.config
    if config.family == "llama" and ".self_attn.q_proj." in name:
      x = unpermute_rows(x, config.num_heads)
    elif config.family == "llama" and ".self_attn.k_proj." in name:
      x = unpermute_rows(x, config.num_kv_heads)
    elif config.norm_unit_offset and "norm.weight" in name:
      x = x - 1.0
    return np.asarray(x, np.float32)


def _float32(value: float) -> float:
  """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99e-06)."""
  return float(str(np.float32(value)))


def config_from_metadata(
    fields: dict[str, Any], tensor_names: list[str]
) -> tuple[ModelConfig | None, list[str]]:
  """(ModelConfig, []) of a GGUF file's metadata, or (None, problems) naming what is wrong.

  The metadata is read into a config.json dict for ``ModelConfig.from_hf``, as transformers'
  ``load_gguf_checkpoint`` does; vocab_size falls back to the token list, and the embeddings are
  tied when there is no ``output.weight``.
  """

  def value(key: str, default: Any = None) -> Any:
    return fields[key].contents() if key in fields else default

  arch = value("general.architecture")
  family = FAMILIES.get(arch)
  if family is None:
    return None, [f"architecture {arch!r} is not supported; expected one of {sorted(FAMILIES)}"]
  required = (
      "block_count",
      "embedding_length",
      "feed_forward_length",
      "attention.head_count",
      "attention.layer_norm_rms_epsilon",
  )
  problems = [f"metadata {arch}.{k} is missing" for k in required if f"{arch}.{k}" not in fields]
  vocab = value(f"{arch}.vocab_size") or len(value("tokenizer.ggml.tokens", []))
  if not vocab:
    problems.append(f"metadata {arch}.vocab_size and tokenizer.ggml.tokens are missing")
  if value(f"{arch}.rope.scaling.type", "none") != "none":
    problems.append(f"rope scaling {value(f'{arch}.rope.scaling.type')!r} is not supported")
  if problems:
    return None, problems

  hidden, heads = value(f"{arch}.embedding_length"), value(f"{arch}.attention.head_count")
  layers = value(f"{arch}.block_count")
  head_dim = value(f"{arch}.attention.key_length") or hidden // heads
  rotary = value(f"{arch}.rope.dimension_count", head_dim)
  if rotary != head_dim:
    problems.append(
        f"partial rotary embeddings ({arch}.rope.dimension_count={rotary}, "
        f"head_dim={head_dim}) are not supported"
    )
  hf: dict[str, Any] = {
      "model_type": family,
      "vocab_size": vocab,
      "hidden_size": hidden,
      "intermediate_size": value(f"{arch}.feed_forward_length"),
      "num_hidden_layers": layers,
      "num_attention_heads": heads,
      "num_key_value_heads": value(f"{arch}.attention.head_count_kv", heads),
      "head_dim": head_dim,
      "rms_norm_eps": _float32(value(f"{arch}.attention.layer_norm_rms_epsilon")),
      "rope_theta": _float32(value(f"{arch}.rope.freq_base", 10_000.0)),
      "max_position_embeddings": value(f"{arch}.context_length", 8192),
      "attention_bias": "blk.0.attn_q.bias" in tensor_names,
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "bos_token_id": value("tokenizer.ggml.bos_token_id"),
      "eos_token_id": value("tokenizer.ggml.eos_token_id"),
      "pad_token_id": value("tokenizer.ggml.padding_token_id"),
  }
  if family == "gemma2":
    hf.update(
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=value(f"{arch}.attention.sliding_window"),
        query_pre_attn_scalar=hidden // heads if layers == 46 else head_dim,
        attn_logit_softcapping=_float32(value(f"{arch}.attn_logit_softcapping", 50.0)),
        final_logit_softcapping=_float32(value(f"{arch}.final_logit_softcapping", 30.0)),
    )
  try:
    config = ModelConfig.from_hf(hf)
  except ValueError as error:
    problems.append(str(error))
  return (None, problems) if problems else (config, [])


def load_tokenizer(path: str):
  """The file's tokenizer and chat template as a transformers ``PreTrainedTokenizerFast``.

  Builds what ``AutoTokenizer.from_pretrained(folder, gguf_file=name)`` builds (transformers'
  ``get_gguf_tokenizer`` + ``convert_gguf_tokenizer``), reading the metadata with ``gguf`` instead of
  transformers' torch-based reader.
  """
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.gguf.gguf_tokenizer_mapping import (
      GGUF_TOKENIZER_MAPPING,
      convert_gguf_tokenizer,
  )

  fields = read_gguf(path).fields
  if "tokenizer.ggml.tokens" not in fields:
    raise CheckpointError(f"{path}: no tokenizer: metadata tokenizer.ggml.tokens is missing")
  metadata = {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.")}
  tokenizer, config = (
      {
          name: metadata[f"tokenizer.{key}"]
          for key, name in renames.items()
          if f"tokenizer.{key}" in metadata
      }
      for renames in (
          GGUF_TOKENIZER_MAPPING["tokenizer"],
          GGUF_TOKENIZER_MAPPING["tokenizer_config"],
      )
  )
  if tokenizer.get("tokenizer_type") == "llama":
    config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece files
  for special in ("bos", "eos", "unk", "pad"):
    index = tokenizer.get(f"{special}_token_id")
    config[f"{special}_token"] = tokenizer["tokens"][index] if index is not None else None
  backend, extra = convert_gguf_tokenizer(fields["general.architecture"].contents(), tokenizer)
  return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
