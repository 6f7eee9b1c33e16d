"""Load and save Hugging Face checkpoint folders (config.json + safetensors) as Decoder models.

Loading builds the abstract model with `nnx.eval_shape`, checks every tensor name and shape
against it from the safetensors headers alone, then reads the tensors one at a time and puts
each directly on its target sharding: the whole model never sits on one host. numpy handles
bfloat16 tensors through ml_dtypes, which jax registers on import.
"""

from __future__ import annotations

import json
import os
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from epi_jax.models.config import ModelConfig
from epi_jax.models.hf_names import (
    IGNORED,
    Layout,
    NameMap,
    from_hf_layout,
    hf_shape,
    to_hf_layout,
)
from epi_jax.models.sharding import variable_sharding
from epi_jax.models.transformer import Decoder

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not fit the model; lists every missing, unexpected, mis-shaped one."""

    def __init__(self, path: str, missing: list[str], unexpected: list[str],
                 mismatched: list[str]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"checkpoint {path} does not match the model:"]
        for title, names in (("missing", missing), ("unexpected", unexpected),
                             ("wrong shape", mismatched)):
            if names:
                lines.append(f"  {title} ({len(names)}):")
                lines.extend(f"    {name}" for name in names)
        super().__init__("\n".join(lines))


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _shard_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return [os.path.join(path, f) for f in files]


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32,
                    mesh: Mesh | None = None) -> tuple[Decoder, ModelConfig]:
    """Reads a local Hugging Face checkpoint folder of a llama, mistral, qwen2 or gemma2 model.

    Args:
      path: folder with config.json and model.safetensors or shards + model.safetensors.index.json.
      dtype: parameter and activation dtype (float32 or bfloat16).
      mesh: place each parameter on this mesh by its logical axes; None: the default device.

    Returns:
      (model, config).

    Raises:
      CheckpointMismatchError: naming every missing, unexpected and mis-shaped tensor.
    """
    path = os.fspath(path)
    config = ModelConfig.from_hf(path)
    abstract = nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    targets = {_path_str(p): (p, v) for p, v in nnx.to_flat_state(state)}
    names = NameMap(config.family)

    plan: dict[str, list[tuple[str, str, Layout]]] = {}  # file -> [(our path, HF name, layout)]
    seen: set[str] = set()
    unexpected, mismatched = [], []
    for file in _shard_files(path):
        plan[file] = []
        with safe_open(file, framework="np") as f:
            for hf_name in f.keys():
                hit = names.to_ours(hf_name)
                if hit is None or hit[0] not in targets:
                    if not IGNORED.match(hf_name):
                        unexpected.append(hf_name)
                    continue
                ours, layout = hit
                seen.add(ours)
                want = hf_shape(layout, targets[ours][1].shape)
                got = tuple(f.get_slice(hf_name).get_shape())
                if got == want:
                    plan[file].append((ours, hf_name, layout))
                else:
                    mismatched.append(f"{hf_name}: shape {got}, expected {want}")
    missing = [names.to_hf(p)[0] for p in targets if p not in seen]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(path, missing, unexpected, mismatched)

    loaded = []
    for file, tensors in plan.items():
        with safe_open(file, framework="np") as f:
            for ours, hf_name, layout in tensors:
                p, variable = targets[ours]
                x = from_hf_layout(f.get_tensor(hf_name), layout, variable.shape).astype(dtype)
                sharding = variable_sharding(variable, mesh) if mesh is not None else None
                loaded.append((p, variable.replace(jax.device_put(x, sharding))))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded)), config


def save_pretrained(model: Decoder, config: ModelConfig, path: str | os.PathLike, *,
                    max_shard_bytes: int = 5 * 10**9, tokenizer=None) -> None:
    """Writes config.json and safetensors (shards + index above `max_shard_bytes`) to `path`.

    The folder loads unchanged with transformers' `AutoModelForCausalLM.from_pretrained`.
    Only one shard at a time is gathered on the host. `tokenizer` (a transformers tokenizer),
    if given, is saved beside the weights.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_hf(), f, indent=2)
    names = NameMap(config.family)
    shards: list[list[tuple[str, nnx.Variable]]] = [[]]
    size = total = 0
    for p, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        nbytes = variable.size * variable.dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((_path_str(p), variable))
        size += nbytes
        total += nbytes
    files = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    weight_map = {}
    for file, shard in zip(files, shards):
        tensors = {}
        for ours, variable in shard:
            hf_name, layout = names.to_hf(ours)
            tensors[hf_name] = to_hf_layout(np.asarray(jax.device_get(variable.get_value())), layout)
            weight_map[hf_name] = file
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
    if len(shards) > 1:
        with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def load_tokenizer(path: str | os.PathLike):
    """The folder's transformers tokenizer (`AutoTokenizer`), or None when it has no tokenizer files."""
    path = os.fspath(path)
    if not any(os.path.exists(os.path.join(path, n)) for n in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer  # imported lazily: transformers is slow to import

    return AutoTokenizer.from_pretrained(path)
