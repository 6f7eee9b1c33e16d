"""The training run: stages in sequence, evaluation after each, checkpoints, resume, summary."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

import epi_jax
from epi_jax._src.state import packed_mask
from epi_jax.data import IteratorState
from epi_jax.eval.evaluation import evaluate
from epi_jax.eval.forgetting import forgetting_ratios, format_table
from epi_jax.eval.judge import Judge
from epi_jax.eval.mask_drift import overlap_at_progress
from epi_jax.eval.metrics import avg_norm_score, headline_row
from epi_jax.models import check_checkpoint
from epi_jax.train.analyses import RunAnalyses
from epi_jax.train.checkpointing import RunCheckpoints, RunRecord, params_sha256
from epi_jax.train.config import Config
from epi_jax.train.distributed import host_array, writes_files
from epi_jax.train.divergence import Divergence, TrainingDiverged
from epi_jax.train.export import MODEL_DIR, save_model
from epi_jax.train.loading import ConfigError, resume_conflicts, to_dict
from epi_jax.train.methods import Run, make_method
from epi_jax.train.model import build_model
from epi_jax.train.optimizer import learning_rate
from epi_jax.train.sharding import build_mesh, like_params, put_batch
from epi_jax.train.step import make_optimizer, make_train_step
from epi_jax.train.tasks import load_tasks, stage_iterators, steps_per_stage
from epi_jax.train.writer import MetricsWriter


def _packed_masks(opt_state) -> dict:
  """The current protection mask by path, packed as the optimizer state holds it (gathered
  from all processes: every process must call it)."""
  return {
      jax.tree_util.keystr(path): host_array(leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(packed_mask(opt_state))[0]
  }


OUTPUTS = (
    "checkpoints",
    "tensorboard",
    "metrics.jsonl",
    "summary.json",
    "heldout_nll.json",
    "adapter",
    "merged",  # written by lora before <run_dir>/model
    MODEL_DIR,
    "exports",
)
"""What a run writes into its directory besides config.yaml (and the judge's cache)."""


def _clear_outputs(run_dir: str) -> None:
  """A fresh start removes the outputs of an earlier run in ``run_dir`` (process 0 does)."""
  if not writes_files():
    return
  for name in OUTPUTS:
    path = os.path.join(run_dir, name)
    if os.path.exists(path):
      print(f"fresh start: removing {path} of an earlier run", file=sys.stderr)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _resume_step(ckpt: RunCheckpoints, run_dir: str, config: Config) -> int:
  """The step to resume from. Refuses a resume under a config that changes training."""
  latest = ckpt.latest_step()
  if latest is None:
    raise ConfigError(f"--resume: no complete checkpoint in {run_dir}/checkpoints")
  try:
    saved = ckpt.record(latest).config
  except (OSError, ValueError, TypeError, KeyError) as error:  # a damaged or missing record
    raise ConfigError(f"--resume: {run_dir}/checkpoints/{latest}: unreadable: {error}") from None
  conflicts = resume_conflicts(saved, config)
  if conflicts:
    raise ConfigError(
        f"--resume: the config differs from checkpoint {latest} of {run_dir} in "
        "keys that change training:\n  " + "\n  ".join(conflicts)
    )
  _drop_records_after(os.path.join(run_dir, "metrics.jsonl"), latest)
  return latest


def _drop_records_after(path: str, step: int) -> None:
  """Removes the metrics an interrupted session wrote after the checkpoint it resumes from."""
  if not writes_files() or not os.path.exists(path):
    return
  with open(path) as f:
    kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
  with open(path, "w") as f:
    f.writelines(kept)


def _judge(config: Config, run_dir: str) -> Judge | None:
  """The LLM judge of eval.judge, its replies cached in the run directory; None if no url."""
  j = config.eval.judge
  if not j.url:
    return None
  return Judge(
      url=j.url,
      model=j.model,
      api_key_env=j.api_key_env,
      timeout=j.timeout,
      retries=j.retries,
      workers=j.workers,
      cache_path=os.path.join(run_dir, "judge_cache.jsonl"),
  )


def init_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    wrt: nnx.filterlib.Filter = nnx.Param,
) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state) of (model, nnx.Optimizer(model, tx, wrt=wrt)), placed on ``mesh`` by
  ``like_params``: each optimizer-state leaf (Adam moments, EPI's sensitivity and bit-packed
  masks) from the sharding metadata of the parameter it mirrors, from the start."""
  optimizer = make_optimizer(model, tx, wrt=wrt)
  state = nnx.state((model, optimizer))
  # One fresh buffer per leaf: an optimizer's init may return one array in two state fields,
  # and the step cannot donate a buffer twice.
  placed = jax.device_put(state, like_params(state, mesh))
  nnx.update((model, optimizer), jax.tree.map(jnp.copy, placed))
  return nnx.split((model, optimizer))


def _summary(method, stages, record: RunRecord, module, optimizer, *, wall_time: float) -> dict:
  """The content of summary.json."""
  summary = {
      "method": method.config.method.type,
      "stages": stages,
      "steps": record.step,
      "accuracy_matrix": [
          {"after_stage": k, "trained": stages[k], "accuracy": row}
          for k, row in enumerate(record.matrix)
      ],
      "final_accuracy": record.matrix[-1],
      "eval_metrics": [{"after_stage": k, **m} for k, m in enumerate(record.eval_metrics)],
      "avg_norm_score": {
          key: record.eval_metrics[-1][key]
          for key in ("avg_norm_score", "normalized", "proxy_tasks", "missing_tasks")
      },
      "forgetting_ratio": forgetting_ratios(record.matrix, stages),
      "mask_history": record.mask_history,
      "wall_time_s": wall_time,
      "params_sha256": params_sha256(nnx.state(module, nnx.Param)),
  }
  if record.mask_history:
    summary["mask_overlap_first"] = overlap_at_progress(record.mask_history, record.step)
  return summary | method.summary(module, optimizer)


def _stop_diverged(run_dir: str, summary: dict) -> None:
  """Writes the summary of a run stopped by divergence and raises TrainingDiverged."""
  event = summary["divergence"]
  if writes_files():
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
  raise TrainingDiverged(
      f"{run_dir}: training diverged at step {event['step']} ({event['reason']}); stopped by "
      "train.on_divergence=stop, nothing saved after the last checkpoint"
  )


def train(config: Config, *, run_dir: str | None = None, resume: bool = False) -> dict:
  """Runs (or resumes) the training described by ``config``; returns the summary it writes."""
  run_dir = run_dir or config.run_dir
  session_start = time.perf_counter()
  # Every input is read and checked before the run directory is touched (docs/trainer.md).
  if config.model.checkpoint:
    check_checkpoint(config.model.checkpoint)
  method = make_method(config)
  task_data = load_tasks(config)
  if resume and not os.path.isdir(os.path.join(run_dir, "checkpoints")):
    raise ConfigError(f"--resume: {run_dir}/checkpoints: no such directory, nothing to resume")
  os.makedirs(run_dir, exist_ok=True)
  if not resume:  # before any process's checkpoint manager reads the directory
    _clear_outputs(run_dir)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("epi_jax: earlier outputs cleared")
  ckpt = RunCheckpoints(run_dir, keep=config.checkpoint.keep)
  start_step = _resume_step(ckpt, run_dir, config) if resume else 0
  judge = _judge(config, run_dir)
  if writes_files():
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
      yaml.safe_dump(to_dict(config) | {"run_dir": run_dir}, f, sort_keys=False)

  stages = method.stages()
  lengths = steps_per_stage(config, stages, task_data)
  bounds = np.cumsum([0] + lengths).tolist()  # stage k runs steps bounds[k]+1 .. bounds[k+1]
  total = bounds[-1]
  mesh = build_mesh(config.mesh)
  num_micro = config.optim.batch_size // (config.optim.micro_batch_size or config.optim.batch_size)
  run = Run(
      config=config,
      task_data=task_data,
      stages=stages,
      total_steps=total,
      mesh=mesh,
      num_micro=num_micro,
      resuming=bool(start_step),
  )

  model = build_model(config.model, seed=config.train.seed, mesh=mesh)
  divergence = Divergence(model.config.vocab_size)
  group_names = epi_jax.layer_groups(nnx.state(model, nnx.Param), config.method.layer_of).names
  trainable = method.trainable(model, run)
  graphdef, state = init_state(trainable.module, trainable.tx, mesh, wrt=trainable.wrt)
  step_fn = make_train_step(
      graphdef,
      num_micro,
      wrt=trainable.wrt,
      logs=method.step_logs,
      shardings=like_params(state, mesh),
  )
  del model, trainable

  record = RunRecord(seed={"data": config.data.seed, "init": config.train.seed})
  masks: dict | None = {} if config.checkpoint.mask_history == "full" else None
  if start_step:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    state, record, masks = ckpt.restore(start_step, abstract, with_masks=masks is not None)
  step = record.step

  schedule = learning_rate(config, total, peak=method.peak_learning_rate())
  iterators = stage_iterators(config, stages, task_data)
  writer = MetricsWriter(run_dir, tensorboard=config.log.tensorboard, group_names=group_names)
  analyses = RunAnalyses(
      config,
      stages=stages,
      bounds=bounds,
      task_data=task_data,
      group_names=group_names,
      mesh=mesh,
      writer=writer,
      record=record,
  )

  scored = config.eval.metric_examples or config.data.n_eval
  metric_examples = {t: examples[:scored] for t, examples in task_data.evaluation.items()}

  def run_eval(model):
    return evaluate(
        model,
        task_data.encoder,
        metric_examples,
        task_data.metrics,
        max_new_tokens=config.eval.max_new_tokens,
        batch_size=config.eval.batch_size,
        judge=judge,
    )

  if not step:  # the length of the run, for whoever follows metrics.jsonl (epi_jax.progress)
    writer.write("plan", 0, {"total_steps": total, "stages": len(stages)})
    analyses.before_training(
        method.eval_model(nnx.merge(graphdef, state)[0]),
        lambda model: headline_row(run_eval(model), task_data.metrics),
    )
  progress = tqdm(
      total=total,
      initial=step,
      disable=not config.log.progress,
      desc=config.method.type,
      dynamic_ncols=True,
  )
  if record.mask_history:
    protected = record.mask_history[-1]["protected_fraction"]
  else:  # a fixed mask (static) protects from the first step
    protected = method.summary(*nnx.merge(graphdef, state)).get("protected_fraction", 0.0)
  tokens, tick = 0.0, time.perf_counter()
  earlier_wall = record.wall_time  # wall time of the sessions before this one

  def save(stage: int, it) -> None:
    record.step, record.config = step, to_dict(config)
    record.data = {"stage": stage, **dataclasses.asdict(it.state)}
    record.wall_time = earlier_wall + time.perf_counter() - session_start
    ckpt.save(step, state, record, masks)

  for k in range(len(stages)):
    if step >= bounds[k + 1]:
      continue
    it = iterators[k]
    if step > bounds[k]:
      it.restore(IteratorState(**{key: v for key, v in record.data.items() if key != "stage"}))
    while step < bounds[k + 1]:
      batch = next(it)
      state, out = step_fn(state, put_batch(batch, mesh))
      step += 1
      tokens += float(batch["attention_mask"].sum())
      if "refreshed" in out and bool(out["refreshed"]):
        stats = {key: np.asarray(v) for key, v in out["refresh"].items()}
        protected = float(stats["protected_fraction"])
        record.mask_history.append(writer.write("mask", step, stats))
        analyses.after_refresh(record.mask_history)
        if masks is not None:
          masks[f"refresh_{step}"] = _packed_masks(nnx.merge(graphdef, state)[1].opt_state)
      if step % config.log.every == 0 or step == bounds[k + 1]:
        jax.block_until_ready(state)  # the whole step, not just its loss, for tokens/s
        now = time.perf_counter()
        loss = float(out["loss"])
        extra = {
            key: v
            for key, v in out.items()
            if key not in ("loss", "tokens", "refreshed", "refresh")
        }
        writer.write(
            "train",
            step,
            {
                "loss": loss,
                "lr": float(schedule(step - 1)),
                "tokens_per_s": tokens / (now - tick),
                "stage": k,
                "protected_fraction": protected,
            }
            | extra,
        )
        progress.set_postfix(
            stage=k,
            loss=f"{loss:.3f}",
            tok_s=f"{tokens / (now - tick):.0f}",
            protected=f"{protected:.4f}",
        )
        tokens, tick = 0.0, now
        if (event := divergence.update(step, loss)) is not None:
          writer.write("divergence", step, event)
          print(f"training diverged at step {step}: {event['reason']}", file=sys.stderr)
          if config.train.on_divergence == "stop":
            _stop_diverged(
                run_dir,
                {"method": config.method.type, "stages": stages, "steps": step}
                | {"divergence": event, "wall_time_s": earlier_wall + now - session_start},
            )
      progress.update(1)
      tick += analyses.after_step(step, graphdef, state)  # analysis time is not training time
      if config.checkpoint.every and step % config.checkpoint.every == 0 and step < bounds[k + 1]:
        save(k, it)
    module, optimizer = nnx.merge(graphdef, state)
    eval_start = time.perf_counter()
    eval_model = method.eval_model(module)
    results = run_eval(eval_model)
    row = headline_row(results, task_data.metrics)
    scores = {
        "results": results,
        **avg_norm_score(results, task_data.metrics),
        "eval_time_s": time.perf_counter() - eval_start,
    }
    writer.write("eval", step, {"stage": k} | row)
    writer.write(
        "eval_metrics",
        step,
        {
            "stage": k,
            "avg_norm_score": scores["avg_norm_score"],
            "eval_time_s": scores["eval_time_s"],
        }
        | {f"{task}/{name}": value for task, r in results.items() for name, value in r.items()},
    )
    record.matrix.append(row)
    record.eval_metrics.append(scores)
    analyses.after_stage(k, step, eval_model)
    logged = method.after_stage(k, module, optimizer, run)
    if logged:
      writer.write("method", step, logged)
    state = nnx.state((module, optimizer))
    save(k, it)
    tick = time.perf_counter()
  progress.close()

  module, optimizer = nnx.merge(graphdef, state)
  summary = _summary(
      method,
      stages,
      record,
      module,
      optimizer,
      wall_time=earlier_wall + time.perf_counter() - session_start,
  )
  summary["analyses"] = analyses.summary(record)
  summary["divergence"] = divergence.event
  method.export(module, run_dir)
  if config.checkpoint.save_model:
    save_model(method.eval_model(module), config, os.path.join(run_dir, MODEL_DIR))
  if writes_files():
    for name, content in {"summary.json": summary, **analyses.files()}.items():
      with open(os.path.join(run_dir, name), "w") as f:
        json.dump(content, f, indent=1)
  writer.close()
  ckpt.close()
  print(format_table(record.matrix, stages, summary["forgetting_ratio"]))
  print(f"wall time {summary['wall_time_s']:.1f}s, params_sha256 {summary['params_sha256']}")
  return summary
