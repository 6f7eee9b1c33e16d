"""LoRA (Hu et al. 2022, arXiv 2106.09685) for ``epi_jax.models.Decoder``, kept in its own pytree.

For a target kernel W the adapted weight is

  W' = W + (alpha / r) * a @ b,   a: [in, r], b: [r, out]

where ``in`` and ``out`` are W's input and output axes flattened in the Hugging Face order (q, k,
v kernels [D, N, Dh]: in = D, out = N * Dh; o [H, Dh, D]: in = H * Dh, out = D; MLP kernels
[in, out]). A scanned model (``scan_layers``) keeps a leading layer axis on W, a and b alike.

The adapters are a nested dict mirroring the parameter paths, e.g.
``adapters["layers"][3]["attn"]["q"] == {"a": ..., "b": ...}`` (scanned:
``adapters["layers"]["attn"]["q"]`` with [L, ...] arrays). ``adapted(model, adapters, config)`` is
the Decoder with the weights W' and every base weight behind ``stop_gradient``: differentiate a
loss of it w.r.t. ``adapters`` and build the optax state from ``adapters`` alone, and the base gets
no gradient and no optimizer state. ``merge`` gives the model to save with
``models.save_pretrained``; ``save_adapter`` / ``load_adapter`` write and read the adapter alone in
PEFT's format, which ``peft.PeftModel.from_pretrained(base, path)`` loads onto the base model.

PEFT's conventions, reproduced from peft 0.21.2 (``tuners/lora/layer.py`` ``update_layer``,
``reset_lora_parameters``, ``Linear.forward``; ``utils/save_and_load.py``
``get_peft_model_state_dict``; ``peft_model.py`` ``save_pretrained``; ``config.py``): lora_A.weight =
a.T is [r, in], initialized kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in));
lora_B.weight = b.T is [out, r], zeros; scaling alpha / r; tensors named
``base_model.model.<module>.lora_A.weight`` with ``<module>`` the base weight's name without
``.weight``; adapter_config.json is LoraConfig's fields, sorted, with inference_mode true.

Dropout: PEFT drops each element of the LoRA input, lora_B(lora_A(dropout(x))). Here LoRA
enters through the weights, never the activations, so the mask is drawn per input feature
and shared by all tokens of a step: rows of ``a`` are kept with probability 1 - p and scaled by
1 / (1 - p), a fresh mask per target and layer. The expectation is PEFT's; the masks are not
per token. Evaluation (no dropout) is exactly PEFT's forward.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from epi_jax.models.checkpoint import CheckpointMismatchError
from epi_jax.models.hf_names import Layout, NameMap
from epi_jax.models.sharding import logical_spec
from epi_jax.models.transformer import Decoder

# Short target name -> the last two parts of its parameter path.
TARGETS = {
    "q": ("attn", "q"),
    "k": ("attn", "k"),
    "v": ("attn", "v"),
    "o": ("attn", "o"),
    "gate": ("mlp", "gate"),
    "up": ("mlp", "up"),
    "down": ("mlp", "down"),
}
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"  # the peft release whose adapter format save_adapter writes


@dataclasses.dataclass(frozen=True, slots=True)
class LoraConfig:
  """Rank, scale, dropout and target modules of the adapters."""

  rank: int = 8
  """r: the inner dimension of a @ b."""
  alpha: float = 16.0
  """The update is scaled by alpha / rank."""
  dropout: float = 0.0
  """Probability of dropping an input feature of the LoRA path while training, 0 <= p < 1."""
  targets: tuple[str, ...] = tuple(TARGETS)
  """Kernels that get adapters, a subset of TARGETS' keys."""

  def __post_init__(self):
    problems = []
    if not isinstance(self.rank, int) or self.rank < 1:
      problems.append(f"rank={self.rank!r} must be an integer >= 1")
    if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
      problems.append(f"alpha={self.alpha!r} must be > 0")
    if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
      problems.append(f"dropout={self.dropout!r} must be in [0, 1)")
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
      problems.append(f"targets={self.targets!r} must be distinct names among {tuple(TARGETS)}")
    if problems:
      raise ValueError("Invalid LoraConfig: " + "; ".join(problems))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class _Target(NamedTuple):
  """One adapted kernel of the model."""

  path: tuple  # its path in nnx.state(model, nnx.Param)
  shape: tuple[int, ...]  # the kernel's shape, leading layer axes included
  lead: int  # number of leading (stacked layer) axes
  layout: Layout  # Hugging Face layout of one layer's slice: (out axes, in axes)
  hf_names: tuple[str, ...]  # Hugging Face weight name of each layer slice
  names: tuple[str | None, ...]  # logical axis names of the kernel

  @property
  def fan_in(self) -> int:
    return math.prod(self.shape[self.lead + ax] for ax in self.layout[1])

  @property
  def fan_out(self) -> int:
    return math.prod(self.shape[self.lead + ax] for ax in self.layout[0])

  def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    lead = self.shape[: self.lead]
    return (*lead, self.fan_in, rank), (*lead, rank, self.fan_out)


def _targets(model: Decoder, config: LoraConfig) -> list[_Target]:
  """The kernels ``config`` adapts, read from per-leaf shapes (real or abstract model).

  A kernel with more axes than its per-layer layout carries one leading layer axis (the
  scanned layout at ``layers/<sub>``); its slice i is block i.
  """
  names = NameMap(model.config.family)
  wanted = {TARGETS[t] for t in config.targets}
  found = []
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[0] != "layers" or tuple(path[-2:]) not in wanted:
      continue
    shape = tuple(variable.shape)
    stacked = isinstance(path[1], str)  # layers/<sub>: no block index in the path
    layers = range(shape[0]) if stacked else [None]
    slice_paths = [("layers", i, *path[1:]) if stacked else path for i in layers]
    hf = [names.to_hf("/".join(map(str, p))) for p in slice_paths]
    layout = hf[0][1]
    lead = len(shape) - sum(len(group) for group in layout)
    if lead != int(stacked):
      raise ValueError(
          f"LoRA target {'/'.join(map(str, path))} has shape {shape}: expected "
          f"{'one leading layer axis' if stacked else 'no leading axis'}"
      )
    logical = variable.get_metadata().get("out_sharding") or (None,) * len(shape)
    found.append(_Target(tuple(path), shape, lead, layout, tuple(n for n, _ in hf), tuple(logical)))
  if not found:
    raise ValueError(f"no LoRA target {config.targets} among the model's parameters")
  return found


def _pair(adapters: dict, target: _Target) -> tuple[jax.Array, jax.Array]:
  node = adapters
  for part in target.path:
    node = node[part]
  return node["a"], node["b"]


def _check(adapters, targets: list[_Target], config: LoraConfig) -> None:
  """Raises ValueError naming every adapter that is missing, unexpected or mis-shaped."""
  flat = traverse_util.flatten_dict(adapters) if isinstance(adapters, dict) else {}
  want = {}
  for t in targets:
    a_shape, b_shape = t.adapter_shapes(config.rank)
    want[(*t.path, "a")], want[(*t.path, "b")] = a_shape, b_shape
  show = lambda key: "/".join(map(str, key))
  problems = [f"missing {show(k)}" for k in want if k not in flat]
  problems += [f"unexpected {show(k)}" for k in flat if k not in want]
  problems += [
      f"{show(k)}: shape {tuple(np.shape(flat[k]))}, expected {s}"
      for k, s in want.items()
      if k in flat and tuple(np.shape(flat[k])) != s
  ]
  if problems:
    raise ValueError("adapters do not match the model and LoraConfig:\n  " + "\n  ".join(problems))


def _to_kernel_layout(ab: jax.Array, target: _Target) -> jax.Array:
  """a @ b [*lead, in, out] rearranged to the kernel's own axes."""
  order = target.layout[1] + target.layout[0]  # kernel axes of ab's (in..., out...) dims
  lead = target.shape[: target.lead]
  x = ab.reshape(*lead, *(target.shape[target.lead + ax] for ax in order))
  return x.transpose(*range(target.lead), *(target.lead + i for i in np.argsort(order)))


def _with_adapters(
    model: Decoder,
    adapters: dict,
    config: LoraConfig,
    *,
    dropout_key: jax.Array | None,
    freeze: bool,
) -> Decoder:
  targets = _targets(model, config)
  _check(adapters, targets, config)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  flat = dict(nnx.to_flat_state(params))
  if freeze:
    flat = {p: v.replace(jax.lax.stop_gradient(v.get_value())) for p, v in flat.items()}
  for i, target in enumerate(targets):
    a, b = _pair(adapters, target)
    a = a.astype(jnp.float32)
    if dropout_key is not None and config.dropout > 0:
      keep = jax.random.bernoulli(
          jax.random.fold_in(dropout_key, i), 1 - config.dropout, a.shape[:-1]
      )
      a = jnp.where(keep[..., None], a / (1 - config.dropout), 0.0)
    ab = jnp.matmul(a, b.astype(jnp.float32)) * config.scale
    kernel = flat[target.path]
    w = kernel.get_value()
    flat[target.path] = kernel.replace(
        (w.astype(jnp.float32) + _to_kernel_layout(ab, target)).astype(w.dtype)
    )
  return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())), rest)


def adapted(
    model: Decoder, adapters: dict, config: LoraConfig, *, dropout_key: jax.Array | None = None
) -> Decoder:
  """The model with every target kernel W replaced by W + (alpha / r) a @ b, for training.

  All base weights pass through ``jax.lax.stop_gradient``: only ``adapters`` get gradients.

  Args:
    model: the base Decoder (unscanned or scanned), left unchanged.
    adapters: from ``init_adapters`` or ``load_adapter``, for this model and ``config``.
    config: the adapters' LoraConfig.
    dropout_key: a PRNG key to apply ``config.dropout`` (see the module docstring); None: no
      dropout (evaluation).

  Returns:
    A new Decoder; call it like the base model, e.g. inside ``models.loss.response_loss``.

  >>> loss = lambda ad: response_loss(adapted(model, ad, cfg, dropout_key=key), batch)[0]
  >>> grads = jax.grad(loss)(adapters)   # shaped like adapters; optax trains them alone
  """
  return _with_adapters(model, adapters, config, dropout_key=dropout_key, freeze=True)


def merge(model: Decoder, adapters: dict, config: LoraConfig) -> Decoder:
  """A new Decoder with W + (alpha / r) a @ b in place of each target kernel (no dropout);
  save it with ``models.save_pretrained`` for ``AutoModelForCausalLM``."""
  return _with_adapters(model, adapters, config, dropout_key=None, freeze=False)


def adapter_axis_names(model: Decoder, config: LoraConfig) -> dict:
  """Logical axis names shaped like the adapters: ``a`` named like its kernel's input axis, ``b``
  like its output axis, the layer axis like the kernel's, the rank axis None."""
  names = {}
  for t in _targets(model, config):
    lead = t.names[: t.lead]
    in_name, out_name = t.names[t.lead + t.layout[1][0]], t.names[t.lead + t.layout[0][0]]
    names[(*t.path, "a")] = (*lead, in_name, None)
    names[(*t.path, "b")] = (*lead, None, out_name)
  return traverse_util.unflatten_dict(names)


def adapter_shardings(model: Decoder, config: LoraConfig, mesh: Mesh) -> dict:
  """NamedShardings shaped like the adapters, from ``adapter_axis_names`` and the mesh rules."""
  flat = traverse_util.flatten_dict(adapter_axis_names(model, config))
  shapes = {}
  for t in _targets(model, config):
    shapes[(*t.path, "a")], shapes[(*t.path, "b")] = t.adapter_shapes(config.rank)
  return traverse_util.unflatten_dict(
      {
          key: NamedSharding(mesh, logical_spec(names, shapes[key], mesh))
          for key, names in flat.items()
      }
  )


def init_adapters(
    model: Decoder,
    config: LoraConfig,
    *,
    key: jax.Array,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
) -> dict:
  """Fresh adapters as PEFT initializes them: a ~ U(-1/sqrt(in), 1/sqrt(in)), b = 0.

  Args:
    model: the base Decoder (may be abstract, from ``nnx.eval_shape``).
    config: rank and targets.
    key: PRNG key; target i draws from ``fold_in(key, i)``.
    dtype: adapter dtype (PEFT keeps adapters in float32 on 16-bit bases by default).
    mesh: create each array directly on this mesh (``adapter_shardings``); None: default device.
  """
  targets = _targets(model, config)

  def make(key):
    flat = {}
    for i, t in enumerate(targets):
      a_shape, b_shape = t.adapter_shapes(config.rank)
      bound = 1.0 / math.sqrt(t.fan_in)
      flat[(*t.path, "a")] = jax.random.uniform(
          jax.random.fold_in(key, i), a_shape, dtype, -bound, bound
      )
      flat[(*t.path, "b")] = jnp.zeros(b_shape, dtype)
    return traverse_util.unflatten_dict(flat)

  shardings = None if mesh is None else adapter_shardings(model, config, mesh)
  return jax.jit(make, out_shardings=shardings)(key)


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
  targets = _targets(model, config)
  _check(adapters, targets, config)
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  tensors = {}
  for t in targets:
    a, b = (np.asarray(jax.device_get(x)) for x in _pair(adapters, t))
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
    for t in _targets(model, config):
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


class LoraMemory(NamedTuple):
  """Bytes LoRA adds to a training step (whole model, before sharding), and its savings."""

  adapter_parameters: int  # entries of all a and b
  adapters: int  # a and b
  adapter_grads: int  # their gradients
  adapter_adam: int  # Adam mu and nu of the adapters
  effective_weights: int  # W + (alpha/r) a @ b of every target, live through the step
  effective_weight_grads: int  # gradient w.r.t. those weights before it reaches a and b (est.)
  base_parameters: int  # entries of the base model

  @property
  def total(self) -> int:
    return (
        self.adapters
        + self.adapter_grads
        + self.adapter_adam
        + self.effective_weights
        + self.effective_weight_grads
    )

  @property
  def per_base_parameter(self) -> float:
    """Extra bytes per parameter of the base model."""
    return self.total / self.base_parameters


def memory_bytes(model: Decoder, config: LoraConfig, *, dtype=jnp.float32) -> LoraMemory:
  """The extra memory of LoRA training for the dry-run plan, from shapes only (an abstract
  model from ``nnx.eval_shape`` works).

  The base model itself is not counted; LoRA gives it no gradient and no optimizer state.
  The effective weights (one copy of the targets in the base dtype) live from the forward to
  the backward pass. Their gradient is one full copy of the targets with ``scan_layers`` (the
  scan's backward returns it stacked), otherwise one target kernel at a time, each freed once
  its a and b gradients are formed. XLA's CPU memory analysis of a 4-layer model
  (docs/methods.md) measures +1.04x the targets unscanned (this estimate: 1.05x) and +2.4x
  scanned (this estimate: 2x).
  """
  targets = _targets(model, config)
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  count = sum(math.prod(s) for t in targets for s in t.adapter_shapes(config.rank))
  itemsize = jnp.dtype(dtype).itemsize
  kernel_bytes = [math.prod(t.shape) * jnp.dtype(params[t.path].dtype).itemsize for t in targets]
  scanned = targets[0].lead > 0
  return LoraMemory(
      adapter_parameters=count,
      adapters=count * itemsize,
      adapter_grads=count * itemsize,
      adapter_adam=2 * count * itemsize,
      effective_weights=sum(kernel_bytes),
      effective_weight_grads=sum(kernel_bytes) if scanned else max(kernel_bytes),
      base_parameters=sum(math.prod(v.shape) for v in params.values()),
  )
