"""The model a run trains, taken out: a Hugging Face folder with the run's tokenizer (and a GGUF
file), written at the end of training (``<run_dir>/model``) or from any checkpoint of a finished
or interrupted run (``python -m epi_jax.export``).

The model is the method's ``eval_model`` (LoRA: the base merged with its adapters). The tokenizer
is the one the run trained with: the byte tokenizer of the synthetic tasks (its special ids
replace the preset's in config.json), else the checkpoint's, which a GGUF export copies from a
.gguf source as it is.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

import epi_jax.data as data
from epi_jax.errors import InputError
from epi_jax.models import (
    Decoder,
    ModelConfig,
    load_tokenizer,
    resolve_checkpoint,
    save_gguf,
    save_pretrained,
)
from epi_jax.models.gguf import is_gguf
from epi_jax.train.checkpointing import RunCheckpoints
from epi_jax.train.config import Config, MeshSection
from epi_jax.train.loading import load_config
from epi_jax.train.methods import Run, make_method
from epi_jax.train.model import model_config
from epi_jax.train.sharding import build_mesh

MODEL_DIR = "model"
"""Where the loop writes the final model inside the run directory."""


class ExportError(InputError, ValueError):
  """A run directory, step or stage that cannot be exported; the message names it."""


def run_tokenizer(config: Config):
  """The transformers tokenizer the run trained with."""
  if config.data.source == "synthetic":
    return data.ByteTokenizer().to_transformers()
  return load_tokenizer(config.model.checkpoint)


def _architecture(model: Decoder, config: Config, tokenizer) -> ModelConfig:
  """The model's config, with the byte tokenizer's special ids on a synthetic run."""
  if config.data.source != "synthetic":
    return model.config
  return dataclasses.replace(
      model.config,
      bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id,
  )


def save_model(model: Decoder, config: Config, out: str, *, gguf_type: str | None = None) -> None:
  """Writes ``model``, trained by the run of ``config``, as a Hugging Face folder ``out`` with
  the run's tokenizer and, with ``gguf_type`` ("f16" or "f32"), ``out/model-<type>.gguf``.
  With several processes every process must call it; process 0 writes."""
  tokenizer = run_tokenizer(config)
  architecture = _architecture(model, config, tokenizer)
  save_pretrained(model, architecture, out, tokenizer=tokenizer)
  if gguf_type is None:
    return
  source = config.model.checkpoint and resolve_checkpoint(config.model.checkpoint)
  carried = source if config.data.source != "synthetic" and source and is_gguf(source) else None
  save_gguf(
      model,
      architecture,
      os.path.join(out, f"model-{gguf_type}.gguf"),
      tokenizer=carried or tokenizer,
      tensor_type=gguf_type,
  )


def run_config(run_dir: str) -> Config:
  """The config a run directory was trained with (its config.yaml)."""
  path = os.path.join(run_dir, "config.yaml")
  if not os.path.isfile(path):
    raise ExportError(f"{run_dir}: not a run directory (no config.yaml)")
  return load_config(path)


def checkpoint_step(
    ckpt: RunCheckpoints, run_dir: str, *, step: int | None = None, stage: int | None = None
) -> int:
  """The step of the checkpoint to export: ``step``, the end of ``stage`` (counted from 0, as
  summary.json's ``after_stage``), or the latest."""
  where = os.path.join(run_dir, "checkpoints")
  steps = sorted(ckpt.manager.all_steps())
  if not steps:
    raise ExportError(f"{where}: no complete checkpoint")
  if step is not None:
    if step not in steps:
      raise ExportError(f"{where}: no checkpoint at step {step} (kept: {_listed(steps)})")
    return step
  if stage is None:
    return steps[-1]
  ends = {}  # stage -> step of the checkpoint saved after its evaluation
  for s in steps:
    record = ckpt.record(s)
    if len(record.matrix) == record.data["stage"] + 1:
      ends[record.data["stage"]] = s
  if stage not in ends:
    raise ExportError(
        f"{where}: no checkpoint at the end of stage {stage} (stages from 0; kept ends of stages: "
        f"{_listed(sorted(ends))}; checkpoint.keep bounds how many are kept)"
    )
  return ends[stage]


def _listed(numbers) -> str:
  return ", ".join(map(str, numbers)) or "none"


def restore_model(run_dir: str, config: Config, step: int) -> Decoder:
  """The model (``eval_model``) of checkpoint ``step`` on one device; the optimizer state is
  not read."""
  method = make_method(config)
  run = Run(
      config=config,
      task_data=None,  # a resuming method prepares nothing from the data
      stages=method.stages(),
      stage_steps=[max(step, 1)],
      mesh=build_mesh(MeshSection()),
      num_micro=1,
      resuming=True,
  )

  def build():
    model = Decoder(
        model_config(config.model), dtype=jnp.dtype(config.model.dtype), rngs=nnx.Rngs(0)
    )
    return method.trainable(model, run).module

  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  # The checkpoint's state item is (module, optimizer): restore item "0" alone.
  target = {
      "0": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  }
  restored = ocp.PyTreeCheckpointer().restore(
      os.path.abspath(os.path.join(run_dir, "checkpoints", str(step), "state")),
      args=ocp.args.PyTreeRestore(
          item=target,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True,
      ),
  )
  return method.eval_model(nnx.merge(graphdef, restored["0"]))


def export_run(
    run_dir: str,
    *,
    out: str | None = None,
    step: int | None = None,
    stage: int | None = None,
    gguf_type: str | None = None,
) -> str:
  """Exports one checkpoint of ``run_dir`` (``checkpoint_step``) with ``save_model``; returns
  the folder, by default ``<run_dir>/exports/step_<N>``."""
  config = run_config(run_dir)
  if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
    raise ExportError(f"{run_dir}: no checkpoints folder")
  ckpt = RunCheckpoints(run_dir, keep=config.checkpoint.keep)
  try:
    chosen = checkpoint_step(ckpt, run_dir, step=step, stage=stage)
  finally:
    ckpt.close()
  out = out or os.path.join(run_dir, "exports", f"step_{chosen}")
  save_model(restore_model(run_dir, config, chosen), config, out, gguf_type=gguf_type)
  return out
