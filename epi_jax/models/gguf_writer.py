"""Decoder models as llama.cpp GGUF files, which ``gguf.GGUFSource`` reads back as the same model.

The conversions of llama.cpp's ``convert_hf_to_gguf.py``, which the reader undoes: tensor names
(``gguf.gguf_name``), llama's q and k rows permuted per head (``gguf.permute_rows``), gemma2's
RMSNorm weights stored as ``w + 1``, dimensions listed fastest first. Matrices are stored F16 or
F32, 1-D tensors (norms, biases) F32 as llama.cpp stores them. The metadata holds every key
``gguf.config_from_metadata`` reads; the tokenizer is copied from a GGUF file or built from a
byte-level BPE transformers tokenizer (``tokenizer.ggml.model`` "gpt2"). Tensors are gathered
and written one parameter slice at a time.
"""

from __future__ import annotations

import json
import math
import os

import gguf
import numpy as np
from flax import nnx

from epi_jax.errors import InputError
from epi_jax.models.checkpoint import host_slices, layer_slots
from epi_jax.models.config import SLIDING, ModelConfig
from epi_jax.models.gguf import gguf_name, permute_rows
from epi_jax.models.hf_names import NameMap, hf_shape, to_hf_layout
from epi_jax.models.transformer import Decoder

Q = gguf.GGMLQuantizationType
TYPES = {"f32": Q.F32, "f16": Q.F16}
"""``tensor_type`` -> the type of the matrices."""
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma2": "gemma2"}
"""family -> ``general.architecture`` (llama.cpp converts Mistral models as llama)."""


class GGUFExportError(InputError, ValueError):
  """A model or tokenizer that a GGUF file cannot hold as this module writes it."""


def unsupported(config: ModelConfig) -> list[str]:
  """What of ``config`` the GGUF metadata cannot express (empty: the file reads back as it)."""
  problems = []
  if config.rope_scaling is not None:
    problems.append(
        "llama3 rope scaling (llama.cpp keeps it in a rope_freqs tensor) is not written"
    )
  if config.family != "gemma2" and SLIDING in config.layer_types:
    problems.append(
        f"sliding-window attention: the GGUF {ARCHITECTURES[config.family]} architecture has none"
    )
  if config.family == "gemma2":
    alternating = tuple(
        SLIDING if i % 2 == 0 else "full_attention" for i in range(config.num_layers)
    )
    if config.layer_types != alternating:
      problems.append("gemma2 layers must alternate sliding and full attention, from layer 0")
    read = config.hidden_size // config.num_heads if config.num_layers == 46 else config.head_dim
    if config.query_pre_attn_scalar != read:
      problems.append(
          f"gemma2 query_pre_attn_scalar={config.query_pre_attn_scalar}: llama.cpp scales "
          f"queries by {read}**-0.5 for this shape"
      )
  return problems


def save_gguf(
    model: Decoder, config: ModelConfig, path: str | os.PathLike, *, tokenizer, tensor_type="f16"
) -> None:
  """Writes ``model`` as one GGUF file that llama.cpp, transformers' ``gguf_file=`` and
  ``from_pretrained`` load.

  Args:
    model: the Decoder (unscanned or scanned); one process.
    config: its ModelConfig (the special token ids of the metadata come from the tokenizer).
    path: the .gguf file to write.
    tokenizer: a .gguf file whose ``tokenizer.*`` metadata (vocabulary, merges, special ids,
      chat template) is copied, or a byte-level BPE transformers fast tokenizer.
    tensor_type: "f16" or "f32" (a key of TYPES), the type of the matrices.

  Raises:
    GGUFExportError: naming what the file cannot hold (``unsupported``, the tokenizer).
  """
  if tensor_type not in TYPES:
    raise GGUFExportError(f"tensor_type={tensor_type!r} is not one of {sorted(TYPES)}")
  if problems := unsupported(config):
    raise GGUFExportError("the model cannot be written as GGUF: " + "; ".join(problems))
  arch = ARCHITECTURES[config.family]
  writer = gguf.GGUFWriter(os.fspath(path), arch)
  writer.add_file_type(_FILE_TYPES[tensor_type])
  _add_architecture(writer, config)
  if isinstance(tokenizer, (str, os.PathLike)):
    _copy_tokenizer(writer, os.fspath(tokenizer), config.vocab_size)
  else:
    _add_tokenizer(writer, tokenizer, config.vocab_size)
  names = NameMap(config.family)
  leaves = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  slots = layer_slots(leaves, model.config)
  dtypes = []  # of each slice, in host_slices order
  for path_, variable in leaves.items():
    for ours, layer in slots[path_]:
      name, layout = names.to_hf(ours)
      hf = hf_shape(layout, variable.shape if layer is None else variable.shape[1:])
      dtypes.append(np.dtype(np.float16 if tensor_type == "f16" and len(hf) > 1 else np.float32))
      writer.add_tensor_info(
          gguf_name(name, arch), hf, dtypes[-1], math.prod(hf) * dtypes[-1].itemsize
      )
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_ti_data_to_file()
  for (ours, value), dtype in zip(host_slices(leaves, slots), dtypes):
    name, layout = names.to_hf(ours)
    x = _to_gguf(name, to_hf_layout(np.asarray(value, np.float32), layout), arch, config)
    writer.write_tensor_data(np.ascontiguousarray(x, dtype))
  writer.close()


def _to_gguf(name: str, x: np.ndarray, arch: str, config: ModelConfig) -> np.ndarray:
  """Tensor ``name`` (Hugging Face layout) as llama.cpp stores it: the inverse of
  ``GGUFSource.read``."""
  if arch == "llama" and ".self_attn.q_proj." in name:
    return permute_rows(x, config.num_heads)
  if arch == "llama" and ".self_attn.k_proj." in name:
    return permute_rows(x, config.num_kv_heads)
  if config.norm_unit_offset and "norm.weight" in name:
    return x + 1.0
  return x


def _add_architecture(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
  """The ``<arch>.*`` keys that ``gguf.config_from_metadata`` reads back into ``config``."""
  writer.add_vocab_size(config.vocab_size)
  writer.add_block_count(config.num_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_key_length(config.head_dim)
  writer.add_value_length(config.head_dim)
  writer.add_rope_dimension_count(config.head_dim)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  if config.family == "gemma2":
    writer.add_sliding_window(config.sliding_window)
    writer.add_attn_logit_softcapping(config.attn_logit_softcap)
    writer.add_final_logit_softcapping(config.final_logit_softcap)


def _copy_tokenizer(writer: gguf.GGUFWriter, path: str, vocab_size: int) -> None:
  """Every ``tokenizer.*`` key of GGUF file ``path``, as it is."""
  fields = gguf.GGUFReader(path).fields
  tokens = fields.get("tokenizer.ggml.tokens")
  if tokens is None or len(tokens.data) != vocab_size:
    count = 0 if tokens is None else len(tokens.data)
    raise GGUFExportError(f"{path}: {count} tokenizer tokens for a model of {vocab_size}")
  for key, field in fields.items():
    if key.startswith("tokenizer."):
      array = field.types[0] == gguf.GGUFValueType.ARRAY
      writer.add_key_value(
          key, field.contents(), field.types[0], sub_type=field.types[-1] if array else None
      )


def _node_types(node) -> set[str]:
  """Every ``type`` named in a tokenizer.json component (nested sequences included)."""
  if isinstance(node, dict):
    return {node.get("type")} | set().union(*map(_node_types, node.values()))
  if isinstance(node, list):
    return set().union(*map(_node_types, node))
  return set()


def _pre_tokenizer_name(pre_tokenizer) -> str:
  """llama.cpp's ``tokenizer.ggml.pre`` of a split regex that transformers' GGUF reader knows,
  else "default"."""
  from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

  text = json.dumps(pre_tokenizer)
  for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
    if json.dumps(regex) in text:
      return name
  return "default"


_NO_MERGES = """GGUF arrays cannot be empty, and llama.cpp and transformers both need the merges of a
"gpt2" tokenizer: a tokenizer without merges (``ByteTokenizer``) gets one that never applies,
of two unused multi-character tokens into a third, which BPE never forms from characters."""


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
  """The ``tokenizer.*`` keys of a byte-level BPE transformers tokenizer; the token list is
  padded to ``vocab_size`` with unused ``[PAD<id>]`` tokens, as llama.cpp's converter pads it
  (``_NO_MERGES`` for a tokenizer without merges)."""
  spec = json.loads(tokenizer.backend_tokenizer.to_str())
  if spec["model"]["type"] != "BPE" or "ByteLevel" not in _node_types(spec["pre_tokenizer"]):
    raise GGUFExportError(
        f"only byte-level BPE tokenizers can be written to GGUF here, not a "
        f"{spec['model']['type']} model with pre-tokenizer {sorted(_node_types(spec['pre_tokenizer']) - {None})}"
    )
  vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
  tokens = sorted(vocab, key=vocab.get)
  if [vocab[t] for t in tokens] != list(range(len(tokens))) or len(tokens) > vocab_size:
    raise GGUFExportError(
        f"the tokenizer's ids are not 0..{len(tokens) - 1} within the model's {vocab_size}"
    )
  special = {t["content"]: t["special"] for t in spec["added_tokens"]}
  types = [
      gguf.TokenType.CONTROL
      if special.get(t)
      else gguf.TokenType.USER_DEFINED
      if t in special
      else gguf.TokenType.NORMAL
      for t in tokens
  ]
  padding = [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
  merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
  if not merges:  # see _NO_MERGES
    if len(padding) < 3:
      raise GGUFExportError(
          f"a tokenizer without merges needs 3 unused ids: it has {len(tokens)} tokens for a "
          f"model of {vocab_size}"
      )
    merges, padding[2] = [f"{padding[0]} {padding[1]}"], padding[0] + padding[1]
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(_pre_tokenizer_name(spec["pre_tokenizer"]))
  writer.add_token_list(tokens + padding)
  writer.add_token_types(types + [gguf.TokenType.UNUSED] * len(padding))
  writer.add_key_value(
      gguf.Keys.Tokenizer.MERGES, merges, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING
  )
  for add, token_id in (
      (writer.add_bos_token_id, tokenizer.bos_token_id),
      (writer.add_eos_token_id, tokenizer.eos_token_id),
      (writer.add_pad_token_id, tokenizer.pad_token_id),
      (writer.add_unk_token_id, tokenizer.unk_token_id),
  ):
    if token_id is not None:
      add(token_id)
  ids = tokenizer("a")["input_ids"]
  writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
  writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id)
  if tokenizer.chat_template:
    writer.add_chat_template(tokenizer.chat_template)
