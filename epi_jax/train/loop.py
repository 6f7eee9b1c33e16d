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
import yaml
from flax import nnx
from tqdm import tqdm

import epi_jax
from epi_jax.data import IteratorState
from epi_jax.eval.analyses import RunAnalyses
from epi_jax.eval.evaluation import evaluate
from epi_jax.eval.forgetting import forgetting_ratios, format_table
from epi_jax.eval.judge import Judge
from epi_jax.eval.mask_drift import overlap_at_progress
from epi_jax.eval.metrics import avg_norm_score, headline_row
from epi_jax.train.checkpointing import RunCheckpoints, params_sha256
from epi_jax.train.config import Config
from epi_jax.train.loading import ConfigError, resume_conflicts, to_dict
from epi_jax.train.metrics import MetricsWriter
from epi_jax.train.model import build_model
from epi_jax.train.optimizer import learning_rate, make_optimizer
from epi_jax.train.probe import static_mask
from epi_jax.train.sharding import build_mesh, like_params, put_batch
from epi_jax.train.step import make_train_step
from epi_jax.train.tasks import load_tasks, plan_stages, stage_iterators, steps_per_stage


def _packed_masks(opt_state) -> dict:
  """The current protection mask, np.packbits along each parameter's last axis, by path."""
  mask = epi_jax.protection_mask(opt_state)
  return {jax.tree_util.keystr(path): np.packbits(np.atleast_1d(np.asarray(leaf)), axis=-1)
          for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]}


def _start_step(run_dir: str, config: Config, resume: bool) -> int:
  """The step to resume from; 0 for a fresh start, which first removes the outputs of an
  earlier run in `run_dir`. Refuses a resume under a config that changes training."""
  if not resume:
    for name in ("checkpoints", "tensorboard", "metrics.jsonl", "summary.json"):
      path = os.path.join(run_dir, name)
      if os.path.exists(path):
        print(f"fresh start: removing {path} of an earlier run", file=sys.stderr)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return 0
  ckpt = RunCheckpoints(run_dir, keep=config.checkpoint.keep)
  latest = ckpt.latest_step()
  if latest is None:
    raise ConfigError(f"--resume: no complete checkpoint in {run_dir}/checkpoints")
  conflicts = resume_conflicts(ckpt.meta(latest)["config"], config)
  ckpt.close()
  if conflicts:
    raise ConfigError(f"--resume: the config differs from checkpoint {latest} of {run_dir} in "
                      "keys that change training:\n  " + "\n  ".join(conflicts))
  _drop_records_after(os.path.join(run_dir, "metrics.jsonl"), latest)
  return latest


def _drop_records_after(path: str, step: int) -> None:
  """Removes the metrics an interrupted session wrote after the checkpoint it resumes from."""
  if not os.path.exists(path):
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
  return Judge(url=j.url, model=j.model, api_key_env=j.api_key_env, timeout=j.timeout,
               retries=j.retries, workers=j.workers,
               cache_path=os.path.join(run_dir, "judge_cache.jsonl"))


def init_state(model: nnx.Module, tx, mesh):
  """(graphdef, state) of (model, nnx.Optimizer(model, tx)), the optimizer state placed on
  `mesh` like the parameters it mirrors."""
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  opt_state = nnx.state(optimizer)
  # One fresh buffer per leaf: an optimizer's init may return one array in two state fields,
  # and the step cannot donate a buffer twice.
  placed = jax.device_put(opt_state, like_params(opt_state, model, mesh))
  nnx.update(optimizer, jax.tree.map(jnp.copy, placed))
  return nnx.split((model, optimizer))


def _summary(method: str, stages, meta: dict, model, optimizer, *, wall_time: float) -> dict:
  """The content of summary.json."""
  summary = {
      "method": method,
      "stages": stages,
      "steps": meta["step"],
      "accuracy_matrix": [{"after_stage": k, "trained": stages[k], "accuracy": row}
                          for k, row in enumerate(meta["matrix"])],
      "final_accuracy": meta["matrix"][-1],
      "eval_metrics": [{"after_stage": k, **m} for k, m in enumerate(meta["eval_metrics"])],
      "avg_norm_score": {key: meta["eval_metrics"][-1][key] for key in (
          "avg_norm_score", "normalized", "proxy_tasks", "missing_tasks")},
      "forgetting_ratio": forgetting_ratios(meta["matrix"], stages),
      "mask_history": meta["mask_history"],
      "wall_time_s": wall_time,
      "params_sha256": params_sha256(nnx.state(model, nnx.Param)),
  }
  if method == "epi":
    summary["mask_overlap_first"] = overlap_at_progress(meta["mask_history"], meta["step"])
  if method in ("static", "epi"):
    mask = jax.tree.leaves(epi_jax.protection_mask(optimizer.opt_state))
    summary["protected_fraction"] = float(sum(np.asarray(m).sum() for m in mask)
                                          / sum(np.size(m) for m in mask))
  return summary


def train(config: Config, *, run_dir: str | None = None, resume: bool = False) -> dict:
  """Runs (or resumes) the training described by `config`; returns the summary it writes."""
  run_dir = run_dir or config.run_dir
  os.makedirs(run_dir, exist_ok=True)
  session_start = time.perf_counter()
  start_step = _start_step(run_dir, config, resume)
  judge = _judge(config, run_dir)
  ckpt = RunCheckpoints(run_dir, keep=config.checkpoint.keep)
  with open(os.path.join(run_dir, "config.yaml"), "w") as f:
    yaml.safe_dump(to_dict(config) | {"run_dir": run_dir}, f, sort_keys=False)

  task_data = load_tasks(config)
  stages = plan_stages(config)
  lengths = steps_per_stage(config, stages, task_data)
  bounds = np.cumsum([0] + lengths).tolist()  # stage k runs steps bounds[k]+1 .. bounds[k+1]
  total = bounds[-1]
  mesh = build_mesh(config.mesh)
  num_micro = config.optim.batch_size // (config.optim.micro_batch_size or config.optim.batch_size)
  method = config.method.type

  model = build_model(config.model, seed=config.train.seed, mesh=mesh)
  mask = None
  if method == "static":
    mask = (static_mask(config, model, task_data, mesh=mesh, num_micro=num_micro)
            if not start_step else jax.tree.map(lambda x: jnp.zeros(x.shape, bool),
                                                nnx.state(model, nnx.Param)))
  graphdef, state = init_state(model, make_optimizer(config, total, mask), mesh)
  group_names = epi_jax.layer_groups(nnx.state(model, nnx.Param)).names
  del model, mask

  meta = {"step": 0, "data": None, "matrix": [], "eval_metrics": [], "mask_history": [],
          "wall_time": 0.0,
          "seed": {"data": config.data.seed, "init": config.train.seed}}
  masks: dict | None = {} if config.checkpoint.mask_history == "full" else None
  if start_step:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    state, meta, masks = ckpt.restore(start_step, abstract, with_masks=masks is not None)
  step = meta["step"]

  schedule = learning_rate(config, total)
  step_fn = make_train_step(graphdef, num_micro)
  iterators = stage_iterators(config, stages, task_data)
  writer = MetricsWriter(run_dir, tensorboard=config.log.tensorboard, group_names=group_names)
  analyses = RunAnalyses(config, stages=stages, bounds=bounds, task_data=task_data,
                         group_names=group_names, mesh=mesh, writer=writer, meta=meta)

  def run_eval(model):
    return evaluate(model, task_data.encoder, task_data.evaluation, task_data.metrics,
                    max_new_tokens=config.eval.max_new_tokens,
                    batch_size=config.eval.batch_size, judge=judge)

  if not step:
    analyses.before_training(nnx.merge(graphdef, state)[0],
                             lambda model: headline_row(run_eval(model), task_data.metrics))
  progress = tqdm(total=total, initial=step, disable=not config.log.progress, desc=method,
                  dynamic_ncols=True)
  protected = meta["mask_history"][-1]["protected_fraction"] if meta["mask_history"] else 0.0
  tokens, tick = 0.0, time.perf_counter()

  earlier_wall = meta["wall_time"]  # wall time of the sessions before this one

  def save(stage: int, it) -> None:
    meta.update(step=step, data={"stage": stage, **dataclasses.asdict(it.state)},
                config=to_dict(config),
                wall_time=earlier_wall + time.perf_counter() - session_start)
    ckpt.save(step, state, meta, masks)

  for k, stage in enumerate(stages):
    if step >= bounds[k + 1]:
      continue
    it = iterators[k]
    if step > bounds[k]:
      saved = meta["data"]
      it.restore(IteratorState(epoch=saved["epoch"], index=saved["index"]))
    while step < bounds[k + 1]:
      batch = next(it)
      state, out = step_fn(state, put_batch(batch, mesh))
      step += 1
      tokens += float(batch["attention_mask"].sum())
      if method == "epi" and step % config.method.interval == 0:
        opt_state = nnx.merge(graphdef, state)[1].opt_state
        stats = {key: np.asarray(v) for key, v in epi_jax.mask_stats(opt_state).items()}
        if int(stats["last_refresh"]) == step:
          protected = float(stats["protected_fraction"])
          meta["mask_history"].append(writer.write("mask", step, stats))
          analyses.after_refresh(meta["mask_history"])
          if masks is not None:
            masks[f"refresh_{step}"] = _packed_masks(opt_state)
      if step % config.log.every == 0 or step == bounds[k + 1]:
        jax.block_until_ready(state)  # the whole step, not just its loss, for tokens/s
        now = time.perf_counter()
        loss = float(out["loss"])
        writer.write("train", step, {"loss": loss, "lr": float(schedule(step - 1)),
                                     "tokens_per_s": tokens / (now - tick), "stage": k,
                                     "protected_fraction": protected})
        progress.set_postfix(stage=k, loss=f"{loss:.3f}", tok_s=f"{tokens / (now - tick):.0f}",
                             protected=f"{protected:.4f}")
        tokens, tick = 0.0, now
      progress.update(1)
      tick += analyses.after_step(step, graphdef, state)  # analysis time is not training time
      if config.checkpoint.every and step % config.checkpoint.every == 0 and step < bounds[k + 1]:
        save(k, it)
    model, _ = nnx.merge(graphdef, state)
    eval_start = time.perf_counter()
    results = run_eval(model)
    row = headline_row(results, task_data.metrics)
    scores = {"results": results, **avg_norm_score(results, task_data.metrics),
              "eval_time_s": time.perf_counter() - eval_start}
    writer.write("eval", step, {"stage": k} | row)
    writer.write("eval_metrics", step, {
        "stage": k, "avg_norm_score": scores["avg_norm_score"],
        "eval_time_s": scores["eval_time_s"]} | {
            f"{task}/{name}": value for task, r in results.items() for name, value in r.items()})
    meta["matrix"].append(row)
    meta["eval_metrics"].append(scores)
    analyses.after_stage(k, step, model)
    save(k, it)
    tick = time.perf_counter()
  progress.close()

  model, optimizer = nnx.merge(graphdef, state)
  summary = _summary(method, stages, meta, model, optimizer,
                     wall_time=earlier_wall + time.perf_counter() - session_start)
  summary["analyses"] = analyses.summary(meta)
  with open(os.path.join(run_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  writer.close()
  ckpt.close()
  print(format_table(meta["matrix"], stages, summary["forgetting_ratio"]))
  print(f"wall time {summary['wall_time_s']:.1f}s, params_sha256 {summary['params_sha256']}")
  return summary
