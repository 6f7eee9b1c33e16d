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
``models.save_pretrained``; ``models.lora_peft`` writes and reads the adapter alone in PEFT's
format.

Initialization and scale follow peft 0.21.2 (``tuners/lora/layer.py`` ``update_layer``,
``reset_lora_parameters``, ``Linear.forward``): a is initialized kaiming-uniform with a = sqrt(5),
i.e. U(-1/sqrt(in), 1/sqrt(in)); b is zeros; the scaling is alpha / r.

Dropout: PEFT drops each element of the LoRA input, lora_B(lora_A(dropout(x))). Here LoRA
enters through the weights, never the activations, so the mask is drawn per input feature
and shared by all tokens of a step: rows of ``a`` are kept with probability 1 - p and scaled by
1 / (1 - p), a fresh mask per target and layer. The expectation is PEFT's; the masks are not
per token. Evaluation (no dropout) is exactly PEFT's forward.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding

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


class Target(NamedTuple):
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


def find_targets(model: Decoder, config: LoraConfig) -> list[Target]:
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
    found.append(Target(tuple(path), shape, lead, layout, tuple(n for n, _ in hf), tuple(logical)))
  if not found:
    raise ValueError(f"no LoRA target {config.targets} among the model's parameters")
  return found


def adapter_pair(adapters: dict, target: Target) -> tuple[jax.Array, jax.Array]:
  node = adapters
  for part in target.path:
    node = node[part]
  return node["a"], node["b"]


def check_adapters(adapters, targets: list[Target], config: LoraConfig) -> None:
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


def _to_kernel_layout(ab: jax.Array, target: Target) -> jax.Array:
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
  targets = find_targets(model, config)
  check_adapters(adapters, targets, config)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  flat = dict(nnx.to_flat_state(params))
  if freeze:
    flat = {p: v.replace(jax.lax.stop_gradient(v.get_value())) for p, v in flat.items()}
  for i, target in enumerate(targets):
    a, b = adapter_pair(adapters, target)
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
  for t in find_targets(model, config):
    lead = t.names[: t.lead]
    in_name, out_name = t.names[t.lead + t.layout[1][0]], t.names[t.lead + t.layout[0][0]]
    names[(*t.path, "a")] = (*lead, in_name, None)
    names[(*t.path, "b")] = (*lead, None, out_name)
  return traverse_util.unflatten_dict(names)


def adapter_shardings(model: Decoder, config: LoraConfig, mesh: Mesh) -> dict:
  """NamedShardings shaped like the adapters, from ``adapter_axis_names`` and the mesh rules."""
  flat = traverse_util.flatten_dict(adapter_axis_names(model, config))
  shapes = {}
  for t in find_targets(model, config):
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
  targets = find_targets(model, config)

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
