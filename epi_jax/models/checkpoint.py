"""Load Decoder models from Hugging Face folders (config.json + safetensors) or llama.cpp GGUF
files, and save them as Hugging Face folders.

Both formats are tensor sources: a config, every tensor's Hugging Face name and shape, and a
``read(name)`` that returns one tensor in the Hugging Face layout. Loading builds the abstract
model with ``nnx.eval_shape``, checks every name and shape against it before reading anything,
then reads the tensors one parameter at a time and puts each directly on its target sharding:
the whole model never sits on one host. With ``scan_layers`` a parameter stacks one tensor per
block along its leading axis; it is filled slice by slice on the host, then placed once.
numpy handles bfloat16 tensors through ml_dtypes, which jax registers on import.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from epi_jax.models.config import CheckpointError, ModelConfig, read_json
from epi_jax.models.gguf import GGUFSource, is_gguf
from epi_jax.models.gguf import load_tokenizer as gguf_tokenizer
from epi_jax.models.hf_names import (
    IGNORED,
    Layout,
    NameMap,
    from_hf_layout,
    hf_shape,
    to_hf_layout,
)
from epi_jax.models.registry import resolve_checkpoint
from epi_jax.models.sharding import variable_sharding
from epi_jax.models.transformer import Decoder

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
GENERATION_FILE = "generation_config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class CheckpointMismatchError(CheckpointError):
  """A checkpoint cannot be loaded; lists every problem of the file (architecture, metadata),
  every tensor of an unsupported type, and every missing, unexpected and mis-shaped tensor."""

  def __init__(
      self, path: str, missing=(), unexpected=(), mismatched=(), *, unsupported=(), problems=()
  ):
    self.missing, self.unexpected, self.mismatched = (
        list(missing),
        list(unexpected),
        list(mismatched),
    )
    self.unsupported, self.problems = list(unsupported), list(problems)
    lines = [f"checkpoint {path} does not match the model:"]
    for title, names in (
        ("problems", self.problems),
        ("unsupported type", self.unsupported),
        ("missing", self.missing),
        ("unexpected", self.unexpected),
        ("wrong shape", self.mismatched),
    ):
      if names:
        lines.append(f"  {title} ({len(names)}):")
        lines.extend(f"    {name}" for name in names)
    super().__init__("\n".join(lines))


class TensorSource(Protocol):
  """A checkpoint's tensors under Hugging Face names, in the Hugging Face layout."""

  path: str
  config: ModelConfig | None  # None when `problems` prevent building one
  problems: list[str]  # what is wrong with the checkpoint as a whole
  unsupported: list[str]  # tensors that cannot be read
  shapes: dict[str, tuple[int, ...]]  # name -> shape, of every tensor

  def label(self, name: str) -> str:
    """How error messages name tensor ``name``."""

  def read(self, name: str) -> np.ndarray:
    """Tensor ``name``."""


class SafetensorsSource:
  """A Hugging Face folder: config.json and model.safetensors, or shards listed in the index."""

  def __init__(self, path: str):
    self.path = path
    self.config = ModelConfig.from_hf(path)
    self.problems: list[str] = []
    self.unsupported: list[str] = []
    self.shapes: dict[str, tuple[int, ...]] = {}
    self._files: dict[str, str] = {}
    for file in _shard_files(path):
      try:
        with safe_open(file, framework="np") as f:
          for name in f.keys():  # noqa: SIM118 (a safetensors handle)
            self._files[name] = file
            self.shapes[name] = tuple(f.get_slice(name).get_shape())
      except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{file}: not a readable safetensors file: {error}") from None

  def label(self, name: str) -> str:
    return name

  def read(self, name: str) -> np.ndarray:
    with safe_open(self._files[name], framework="np") as f:
      return f.get_tensor(name)


def _shard_files(path: str) -> list[str]:
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
      raise CheckpointError(f'{index}: needs a "weight_map" of tensor name -> file name')
    files = sorted(set(weight_map.values()))
  elif os.path.exists(os.path.join(path, SINGLE_FILE)):
    files = [SINGLE_FILE]
  else:
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
  if not files:
    raise CheckpointError(f"{path}: no *.safetensors files")
  return [os.path.join(path, f) for f in files]


def _resolve(path: str | os.PathLike) -> str:
  """The folder or .gguf file of a checkpoint path or alias."""
  path = resolve_checkpoint(path)
  if not is_gguf(path) and not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a checkpoint: a Hugging Face folder or a .gguf file")
  return path


def open_checkpoint(path: str | os.PathLike) -> TensorSource:
  """The tensor source of a Hugging Face folder, a .gguf file, or an alias (registry.ALIASES)."""
  path = _resolve(path)
  return GGUFSource(path) if is_gguf(path) else SafetensorsSource(path)


def checkpoint_config(path: str | os.PathLike) -> ModelConfig:
  """The ModelConfig of a checkpoint (folder, .gguf file or alias), read without its tensors."""
  path = _resolve(path)
  return _config(GGUFSource(path)) if is_gguf(path) else ModelConfig.from_hf(path)


def _config(source: TensorSource) -> ModelConfig:
  if source.config is None:
    raise CheckpointMismatchError(
        source.path, unsupported=source.unsupported, problems=source.problems
    )
  return source.config


Slots = dict[tuple, list[tuple[str, int | None]]]


def layer_slots(leaves: dict[tuple, nnx.Variable], config: ModelConfig) -> Slots:
  """Each parameter's per-block paths (those of the unscanned model, "layers/3/attn/q") with
  their index along its stacked layer axis; an unstacked parameter has one path and None."""
  slots: Slots = {}
  for path in leaves:
    parts = [str(p) for p in path]
    if config.scan_layers and parts[0] == "layers":
      slots[path] = [
          ("/".join(["layers", str(i), *parts[1:]]), i) for i in range(config.num_layers)
      ]
    else:
      slots[path] = [("/".join(parts), None)]
  return slots


def _match(
    source: TensorSource, leaves: dict[tuple, nnx.Variable], slots: Slots, names: NameMap
) -> dict[str, tuple[str, Layout]]:
  """Per-block path -> (tensor name, layout) of every parameter slice.

  Raises:
    CheckpointMismatchError: naming every problem of the source at once.
  """
  where = {ours: (path, layer) for path, parts in slots.items() for ours, layer in parts}
  plan: dict[str, tuple[str, Layout]] = {}
  unexpected, mismatched = [], []
  for name, got in source.shapes.items():
    hit = names.to_ours(name)
    if hit is None or hit[0] not in where:
      if not IGNORED.match(name):
        unexpected.append(source.label(name))
      continue
    ours, layout = hit
    path, layer = where[ours]
    shape = leaves[path].shape if layer is None else leaves[path].shape[1:]
    plan[ours] = (name, layout)
    if got != (want := hf_shape(layout, shape)):
      mismatched.append(f"{source.label(name)}: shape {got}, expected {want}")
  missing = [source.label(names.to_hf(ours)[0]) for ours in where if ours not in plan]
  if missing or unexpected or mismatched or source.unsupported or source.problems:
    raise CheckpointMismatchError(
        source.path,
        missing,
        unexpected,
        mismatched,
        unsupported=source.unsupported,
        problems=source.problems,
    )
  return plan


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    scan_layers: bool = False,
    remat: str = "none",
    compute_dtype: str | None = None,
) -> tuple[Decoder, ModelConfig]:
  """Reads a llama, mistral, qwen2 or gemma2 checkpoint: a Hugging Face folder or a GGUF file.

  Args:
    path: a folder with config.json and model.safetensors (or shards + index), a llama.cpp
      ``.gguf`` file (any tensor type ``gguf.quants`` dequantizes), or an alias such as
      "smollm2-135m-instruct" (``registry.ALIASES``).
    dtype: the stored parameters' dtype (float32 or bfloat16).
    mesh: place each parameter on this mesh by its logical axes; None: the default device.
    scan_layers, remat, compute_dtype: the ModelConfig switches of the same names.

  Returns:
    (model, config).

  Raises:
    CheckpointMismatchError: naming every problem: unsupported architecture or metadata,
      tensors of unsupported types, missing, unexpected and mis-shaped tensors.
  """
  source = open_checkpoint(path)
  config = dataclasses.replace(
      _config(source), scan_layers=scan_layers, remat=remat, compute_dtype=compute_dtype
  )
  graphdef, leaves, slots, plan = _plan(source, config, dtype)
  loaded = []
  for path_, variable in leaves.items():
    host = np.empty(variable.shape, dtype)
    for ours, layer in slots[path_]:
      index = ... if layer is None else layer
      name, layout = plan[ours]
      host[index] = from_hf_layout(source.read(name), layout, host[index].shape)
    sharding = variable_sharding(variable, mesh) if mesh is not None else None
    loaded.append((path_, variable.replace(jax.device_put(host, sharding))))
  return nnx.merge(graphdef, nnx.from_flat_state(loaded)), config


def _plan(source: TensorSource, config: ModelConfig, dtype):
  """(graphdef, abstract parameters by path, their slots, the tensor of every slot) of the
  model ``config`` describes, matched against ``source``'s names and shapes."""
  abstract = nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  leaves = dict(nnx.to_flat_state(state))
  slots = layer_slots(leaves, config)
  return graphdef, leaves, slots, _match(source, leaves, slots, NameMap(config.family))


def check_checkpoint(path: str | os.PathLike) -> ModelConfig:
  """A checkpoint's config, after checking its headers against the model it describes: every
  file readable, every tensor present, known and of the right shape. No tensor is read.

  Raises:
    CheckpointError: naming the file and what is wrong (``CheckpointMismatchError``: every
      bad tensor at once).
  """
  source = open_checkpoint(path)
  config = _config(source)
  _plan(source, config, jnp.float32)
  return config


def host_slices(leaves: dict[tuple, nnx.Variable], slots: Slots):
  """(per-block path, numpy value) of every parameter slice, in ``slots`` order; gathers one
  parameter at a time (from every process when it spans several: all must iterate)."""
  for path, variable in leaves.items():
    value = variable.get_value()
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
      value = multihost_utils.process_allgather(value, tiled=True)
    value = np.asarray(jax.device_get(value))
    for ours, layer in slots[path]:
      yield ours, value if layer is None else value[layer]


def generation_config(config: ModelConfig) -> dict:
  """The generation_config.json of ``config``: its special token ids (transformers' ``generate``
  stops at ``eos_token_id``)."""
  eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
  ids = {
      "bos_token_id": config.bos_token_id,
      "eos_token_id": eos,
      "pad_token_id": config.pad_token_id,
  }
  return {k: v for k, v in ids.items() if v is not None}


def _write_json(path: str, content: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(content, f, indent=2)


def save_pretrained(
    model: Decoder,
    config: ModelConfig,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 10**9,
    tokenizer=None,
) -> None:
  """Writes config.json, generation_config.json and safetensors (shards + index above
  ``max_shard_bytes``) to ``path``.

  The folder loads unchanged with transformers' ``AutoModelForCausalLM.from_pretrained``,
  whatever the model was loaded from; stacked (scanned) parameters are written per block.
  Only one shard and one parameter at a time are gathered on the host. ``tokenizer`` (a
  transformers tokenizer), if given, is saved beside the weights. With several processes every
  process must call it (parameters are gathered from all of them); process 0 writes.
  """
  path = os.fspath(path)
  writes = jax.process_index() == 0
  if writes:
    os.makedirs(path, exist_ok=True)
    _write_json(os.path.join(path, "config.json"), config.to_hf())
    _write_json(os.path.join(path, GENERATION_FILE), generation_config(config))
  names = NameMap(config.family)
  leaves = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  slots = layer_slots(leaves, model.config)
  shards: list[list[str]] = [[]]  # per-block paths of each file
  size = total = 0
  for path_, variable in leaves.items():
    nbytes = variable.size * variable.dtype.itemsize // len(slots[path_])
    for ours, _ in slots[path_]:
      if shards[-1] and size + nbytes > max_shard_bytes:
        shards.append([])
        size = 0
      shards[-1].append(ours)
      size += nbytes
      total += nbytes
  files = (
      [SINGLE_FILE]
      if len(shards) == 1
      else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
  )
  weight_map: dict[str, str] = {}
  slices = host_slices(leaves, slots)
  for file, shard in zip(files, shards):
    tensors = {}
    for ours, value in itertools.islice(slices, len(shard)):
      name, layout = names.to_hf(ours)
      tensors[name] = to_hf_layout(value, layout)
      weight_map[name] = file
    if writes:
      save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
  if writes and len(shards) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(os.path.join(path, INDEX_FILE), index)
  if writes and tokenizer is not None:
    tokenizer.save_pretrained(path)


def load_tokenizer(path: str | os.PathLike):
  """The checkpoint's transformers tokenizer: from a folder's tokenizer files (None when it has
  none), or from a .gguf file's metadata (``gguf.load_tokenizer``), chat template included."""
  path = _resolve(path)
  if is_gguf(path):
    return gguf_tokenizer(path)
  if not any(os.path.exists(os.path.join(path, n)) for n in _TOKENIZER_FILES):
    return None
  for name in ("tokenizer.json", "tokenizer_config.json"):  # named on a parse error
    if os.path.exists(os.path.join(path, name)):
      read_json(os.path.join(path, name))
  from transformers import AutoTokenizer  # imported lazily: transformers is slow to import

  return AutoTokenizer.from_pretrained(path)
