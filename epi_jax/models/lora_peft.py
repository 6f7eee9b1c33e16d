"""LoRA adapters (``models.lora``) in PEFT's file format: ``save_adapter`` / ``load_adapter`` write
and read the adapter alone, which ``peft.PeftModel.from_pretrained(base, path)`` loads onto the
base model.

PEFT's conventions, reproduced from peft 0.21.2 (``utils/save_and_load.py``
``get_peft_model_state_dict``; ``peft_model.py`` ``save_pretrained``; ``config.py``):
lora_A.weight = a.T is [r, in]; lora_B.weight = b.T is [out, r]; tensors named
``base_model.model.<module>.lora_A.weight`` with ``<module>`` the base weight's name without
``.weight``; adapter_config.json is LoraConfig's fields, sorted, with inference_mode true.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from epi_jax.models.checkpoint import CheckpointMismatchError
from epi_jax.models.hf_names import NameMap
from epi_jax.models.lora import TARGETS, LoraConfig, check_adapters, adapter_pair, find_targets, adapter_shardings
from epi_jax.models.transformer import Decoder

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"  # the peft release whose adapter format save_adapter writes


def _peft_modules(family: str) -> dict[str, str]:
  """PEFT module name of each target (``q_proj``, ...) -> its short name (``q``, ...)."""
  names = NameMap(family)
  return {
      names.to_hf("layers/0/" + "/".join(sub))[0].split(".")[-2]: short
      for short, sub in TARGETS.items()
  }


def _peft_names(hf_name: str) -> tuple[str, str]:
  """PEFT's (lora_A, lora_B) tensor names for a base weight ``model.layers.0...q_proj.weight``."""
  module = PEFT_PREFIX + hf_name.removesuffix(".weight")
  return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def peft_config(
    model: Decoder, config: LoraConfig, *, base_model_name_or_path: str | None = None
) -> dict:
  """The adapter_config.json that peft 0.21.2's ``PeftModel.save_pretrained`` writes for the
  same adapter: every LoraConfig field, defaults for what this module does not use."""
  return {
      "alora_invocation_tokens": None,
      "alpha_pattern": {},
      "arrow_config": None,
      "auto_mapping": None,
      "base_model_name_or_path": base_model_name_or_path,
      "bias": "none",
      "corda_config": None,
      "ensure_weight_tying": False,
      "eva_config": None,
      "exclude_modules": None,
      "fan_in_fan_out": False,
      "inference_mode": True,
      "init_lora_weights": True,
      "kasa_config": None,
      "layer_replication": None,
      "layers_pattern": None,
      "layers_to_transform": None,
      "loftq_config": {},
      "lora_alpha": config.alpha,
      "lora_bias": False,
      "lora_dropout": config.dropout,
      "lora_ga_config": None,
      "megatron_config": None,
      "megatron_core": "megatron.core",
      "modules_to_save": None,
      "monteclora_config": None,
      "peft_type": "LORA",
      "peft_version": PEFT_VERSION,
      "qalora_group_size": 16,
      "r": config.rank,
      "rank_pattern": {},
      "revision": None,
      "target_modules": sorted(
          m for m, short in _peft_modules(model.config.family).items() if short in config.targets
      ),
      "target_parameters": None,
      "task_type": "CAUSAL_LM",
      "trainable_token_indices": None,
      "use_bdlora": None,
      "use_dora": False,
      "use_qalora": False,
      "use_rslora": False,
      "velora_config": None,
  }


def save_adapter(
    model: Decoder,
    adapters: dict,
    config: LoraConfig,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
) -> None:
  """Writes adapter_config.json and adapter_model.safetensors in PEFT's format to ``path``.

  Tensors are per block (a scanned model's stacked adapters are split), lora_A [r, in] and
  lora_B [out, r] in the adapters' dtype, gathered on the host (they are small).
  ``base_model_name_or_path`` is recorded in the config as PEFT does.
  """
  targets = find_targets(model, config)
  check_adapters(adapters, targets, config)
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  tensors = {}
  for t in targets:
    a, b = (np.asarray(jax.device_get(x)) for x in adapter_pair(adapters, t))
    for i, hf_name in enumerate(t.hf_names):
      a_i, b_i = (a[i], b[i]) if t.lead else (a, b)
      name_a, name_b = _peft_names(hf_name)
      tensors[name_a] = np.ascontiguousarray(a_i.T)
      tensors[name_b] = np.ascontiguousarray(b_i.T)
  save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(
        peft_config(model, config, base_model_name_or_path=base_model_name_or_path),
        f,
        indent=2,
        sort_keys=True,
    )


# adapter_config.json values load_adapter accepts besides the ones it reads.
_SUPPORTED = {
    "peft_type": "LORA",
    "bias": "none",
    "use_rslora": False,
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "modules_to_save": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
}


def load_adapter(
    model: Decoder, path: str | os.PathLike, *, dtype=jnp.float32, mesh: Mesh | None = None
) -> tuple[dict, LoraConfig]:
  """Reads a PEFT LoRA adapter folder (as ``save_adapter`` or peft write it) for ``model``.

  Returns:
    (adapters, config), the adapters stacked per layer when ``model`` is scanned and placed on
    ``mesh`` when given.

  Raises:
    CheckpointMismatchError: naming every unsupported config value and every missing,
      unexpected and mis-shaped tensor.
  """
  path = os.fspath(path)
  with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
    raw = json.load(f)
  problems = [
      f"{CONFIG_FILE}: {k}={raw[k]!r} is not supported (only {v!r})"
      for k, v in _SUPPORTED.items()
      if k in raw and raw[k] not in (v, None)
  ]
  modules, known = raw.get("target_modules"), _peft_modules(model.config.family)
  if not isinstance(modules, list) or not modules or not set(modules) <= set(known):
    problems.append(
        f"{CONFIG_FILE}: target_modules={modules!r} must be a non-empty list "
        f"among {sorted(known)}"
    )
  else:
    try:
      config = LoraConfig(
          rank=raw.get("r"),
          alpha=raw.get("lora_alpha"),
          dropout=raw.get("lora_dropout") or 0.0,
          targets=tuple(t for t in TARGETS if t in {known[m] for m in modules}),
      )
    except ValueError as e:
      problems.append(f"{CONFIG_FILE}: {e}")
  if problems:
    raise CheckpointMismatchError(path, problems=problems)
  with safe_open(os.path.join(path, WEIGHTS_FILE), framework="np") as f:
    shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}  # noqa: SIM118 (a safetensors handle)
    flat, missing, mismatched, seen = {}, [], [], set()
    for t in find_targets(model, config):
      slices = {"a": [], "b": []}
      for hf_name in t.hf_names:
        for kind, name, want in zip(
            "ab", _peft_names(hf_name), ((config.rank, t.fan_in), (t.fan_out, config.rank))
        ):
          seen.add(name)
          if name not in shapes:
            missing.append(name)
          elif shapes[name] != want:
            mismatched.append(f"{name}: shape {shapes[name]}, expected {want}")
          else:
            slices[kind].append(f.get_tensor(name).T)
      if all(len(s) == len(t.hf_names) for s in slices.values()):
        for kind, parts in slices.items():
          flat[(*t.path, kind)] = np.stack(parts) if t.lead else parts[0]
  unexpected = sorted(set(shapes) - seen)
  if problems or missing or unexpected or mismatched:
    raise CheckpointMismatchError(path, missing, unexpected, mismatched, problems=problems)
  shardings = (
      traverse_util.flatten_dict(adapter_shardings(model, config, mesh)) if mesh is not None else {}
  )
  adapters = {k: jax.device_put(v.astype(dtype), shardings.get(k)) for k, v in flat.items()}
  return traverse_util.unflatten_dict(adapters), config
