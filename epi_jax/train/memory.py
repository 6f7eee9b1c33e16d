"""The dry run's memory plan: per-device bytes of every training buffer on the configured mesh,
computed from abstract shapes only (``nnx.eval_shape`` / ``jax.eval_shape``, no allocation)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from epi_jax.eval.generation import SCORING_LENGTH
from epi_jax.models import ModelConfig
from epi_jax.models.loss import LOGIT_CHUNK_BYTES
from epi_jax.models.sharding import MESH_AXES, logical_spec
from epi_jax.train.config import Config
from epi_jax.train.methods import METHODS
from epi_jax.train.methods.base import GIB, tree_bytes
from epi_jax.train.model import abstract_model, model_config
from epi_jax.train.optimizer import float32_params, inner_optimizer

__all__ = ["GIB", "activation_bytes", "evaluation_bytes", "format_plan", "memory_plan"]


def _device_fraction(params_state, mesh: AbstractMesh) -> tuple[int, float]:
  """(parameter count, fraction of all parameter entries one device holds)."""
  total = held = 0
  for v in jax.tree.leaves(params_state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = v.get_metadata().get("out_sharding") or (None,) * len(v.shape)
    spec = logical_spec(names, v.shape, mesh)
    split = math.prod(
        mesh.shape[a] for part in spec if part for a in ((part,) if isinstance(part, str) else part)
    )
    total += math.prod(v.shape)
    held += math.prod(v.shape) / split
  return total, held / total


def activation_bytes(config: Config, architecture: ModelConfig | None = None) -> float:
  """Estimate of the activations one device keeps for the backward pass of a micro-batch.

  Per block, in 16-bit (Korthikanti et al. 2022, arXiv 2205.05198, Sec. 4 and 5), scaled to
  the compute dtype: s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes without recomputation. With
  ``model.remat: dots`` only the outputs of the weight matmuls stay (q, k, v, o, gate, up, down:
  s*b*(H*Dh + 2*K*Dh + 2*h + 2*f)/t values); with ``block`` each block keeps only its s*b*h
  input, plus one block's full activations while it is recomputed. Plus the logits of one
  chunk and their gradient (``models.loss``: never the whole [s*b, V]).
  """
  c, o, mesh = model_config(config.model, architecture), config.optim, config.mesh
  rows = math.ceil((o.micro_batch_size or o.batch_size) / (mesh.data * mesh.fsdp))
  s, h, a, t = config.data.seq_len, c.hidden_size, c.num_heads, mesh.tensor
  width = jnp.dtype(config.model.compute_dtype or config.model.dtype).itemsize
  linear = s * rows * h * (10 + 24 / t) * width / 2
  scores = s * rows * h * 5 * a * s / (h * t) * width / 2
  matmul_outputs = (
      c.num_heads * c.head_dim + 2 * c.num_kv_heads * c.head_dim + 2 * h + 2 * c.intermediate_size
  )
  kept = {
      "none": c.num_layers * (linear + scores),
      "dots": c.num_layers * s * rows * matmul_outputs / t * width,
      "block": c.num_layers * s * rows * h * width + linear + scores,
  }[c.remat]
  return kept + 2 * logit_bytes(rows * s, c.vocab_size / t)


def logit_bytes(tokens: int, vocab: float) -> float:
  """Float32 logits of ``tokens`` tokens as ``models.loss`` makes them: one chunk at a time."""
  return min(tokens, max(1, LOGIT_CHUNK_BYTES // (4 * vocab))) * vocab * 4


def evaluation_bytes(config: Config, architecture: ModelConfig | None = None) -> dict[str, float]:
  """Estimates of the evaluation's largest buffers on one device: generation's KV cache for
  ``eval.batch_size`` prompts of up to ``data.seq_len`` tokens plus ``eval.max_new_tokens``
  (twice: the decode loop's carry is copied), and the scoring pass's logit chunk plus its
  widest activation (one block's MLP: rows * length * intermediate_size values) at the longest
  length a call of ``eval.batch_size`` rows holds (``eval.generation.scoring_rows``)."""
  c, e = model_config(config.model, architecture), config.eval
  width = jnp.dtype(config.model.compute_dtype or config.model.dtype).itemsize
  slots = config.data.seq_len + e.max_new_tokens
  cache = 2 * c.num_layers * e.batch_size * slots * c.num_kv_heads * c.head_dim * width
  tokens = e.batch_size * max(config.data.seq_len, SCORING_LENGTH)
  return {
      "generation": 2 * cache,
      "scoring": logit_bytes(tokens, c.vocab_size) + tokens * c.intermediate_size * width,
  }


def memory_plan(config: Config, architecture: ModelConfig | None = None) -> dict:
  """Parameter count and per-device GiB of params, grads, Adam moments and activations, and
  under ``methods`` each method's own rows (``Method.memory_plan``: EPI's sensitivity options,
  LoRA's adapters, EWC's Fisher).

  ``architecture`` plans for a decoder of those shapes in place of the one ``config.model``
  names (its other switches still apply): shapes no preset has, as benchmarks/gpu.py's."""
  mesh = AbstractMesh((config.mesh.data, config.mesh.fsdp, config.mesh.tensor), MESH_AXES)
  model = abstract_model(config.model, architecture)
  count, fraction = _device_fraction(nnx.state(model, nnx.Param), mesh)
  params32 = float32_params(model)
  inner = inner_optimizer(config, 1000)
  per_device = lambda tree: tree_bytes(tree) * fraction / GIB
  plan = {
      "parameters": count,
      "devices": config.mesh.data * config.mesh.fsdp * config.mesh.tensor,
      "mesh": {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor},
      "params_gib": per_device(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
      "grads_gib": per_device(params32),
      "adam_moments_gib": per_device(  # mu and nu; the scalar counters are negligible
          [leaf for leaf in jax.tree.leaves(jax.eval_shape(inner.init, params32)) if leaf.ndim]
      ),
      "activations_gib": activation_bytes(config, architecture) / GIB,
      **{
          f"{name}_gib": value / GIB
          for name, value in evaluation_bytes(config, architecture).items()
      },
  }
  plan["total_without_epi_gib"] = (
      plan["params_gib"] + plan["grads_gib"] + plan["adam_moments_gib"] + plan["activations_gib"]
  )
  plan["methods"] = {
      name: rows
      for name, method in METHODS.items()
      if (rows := method(config).memory_plan(model, plan, fraction))
  }
  return plan


def format_plan(plan: dict, config: Config) -> str:
  """A readable table of ``memory_plan``'s result; each method prints its rows
  (``Method.memory_table``)."""
  m = plan["mesh"]
  n = plan["parameters"]
  size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
  lines = [
      f"model {config.model.checkpoint or config.model.preset} ({config.model.dtype} parameters, "
      f"{config.model.compute_dtype or config.model.dtype} compute): {n:,} parameters ({size})",
      f"mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']} ({plan['devices']} devices), "
      f"micro-batch {config.optim.micro_batch_size or config.optim.batch_size} x "
      f"{config.data.seq_len} tokens",
      "per-device memory (GiB):",
      f"  params            {plan['params_gib']:9.2f}",
      f"  grads             {plan['grads_gib']:9.2f}",
      f"  Adam mu + nu      {plan['adam_moments_gib']:9.2f}",
      f"  activations (est) {plan['activations_gib']:9.2f}   (remat={config.model.remat})",
      f"  eval generation   {plan['generation_gib']:9.2f}   (KV cache, eval.batch_size="
      f"{config.eval.batch_size})",
      f"  eval scoring      {plan['scoring_gib']:9.2f}",
      f"  total without EPI {plan['total_without_epi_gib']:9.2f}",
  ]
  header = None
  for name, rows in plan["methods"].items():
    method_header, method_lines = METHODS[name](config).memory_table(rows)
    if method_header != header:
      header = method_header
      lines.append(header)
    lines += method_lines
  return "\n".join(lines)
