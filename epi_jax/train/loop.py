"""The training run: stages in sequence, evaluation after each, checkpoints, resume, summary.

``train`` reads as setup (the run directory, ``setup.setup_run``), the stage loop and the save
(``_Session``). ``init_state`` lives in ``epi_jax.train.setup``; it stays importable from here."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time

import jax
import yaml
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

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
from epi_jax.train.distributed import writes_files
from epi_jax.train.divergence import Divergence, TrainingDiverged
from epi_jax.train.export import MODEL_DIR, save_model
from epi_jax.train.host_memory import release_free_memory
from epi_jax.train.loading import ConfigError, resume_conflicts, to_dict
from epi_jax.train.methods import make_method
from epi_jax.train.optimizer import learning_rate
from epi_jax.train.setup import RunSetup, init_state, setup_run
from epi_jax.train.sharding import put_batch
from epi_jax.train.tasks import load_tasks, stage_iterators
from epi_jax.train.writer import MetricsWriter

__all__ = ["OUTPUTS", "init_state", "train"]


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


class _Session:
  """One session of a run, from its first (or resumed) step to summary.json: the state, the
  record that checkpoints carry, the metrics writer and the analyses."""

  def __init__(
      self,
      config: Config,
      setup: RunSetup,
      *,
      run_dir: str,
      ckpt: RunCheckpoints,
      judge: Judge | None,
      start_step: int,
      session_start: float,
  ):
    self.config, self.run_dir, self.ckpt, self.judge = config, run_dir, ckpt, judge
    self.method, self.run, self.bounds = setup.method, setup.run, setup.bounds
    self.stages, self.task_data = setup.run.stages, setup.run.task_data
    self.graphdef, self.state, self.step_fn = setup.graphdef, setup.state, setup.step_fn
    self.session_start = session_start
    self.divergence = Divergence(setup.model_config.vocab_size)
    self.record = RunRecord(seed={"data": config.data.seed, "init": config.train.seed})
    self.masks: dict | None = {} if config.checkpoint.mask_history == "full" else None
    if start_step:
      abstract = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state
      )
      self.state, self.record, self.masks = ckpt.restore(
          start_step, abstract, with_masks=self.masks is not None
      )
    self.step = self.record.step
    self.schedule = learning_rate(
        config, self.run.stage_steps, peak=self.method.peak_learning_rate()
    )
    self.iterators = stage_iterators(config, self.stages, self.task_data)
    self.writer = MetricsWriter(
        run_dir, tensorboard=config.log.tensorboard, group_names=setup.group_names
    )
    self.analyses = RunAnalyses(
        config,
        stages=self.stages,
        bounds=self.bounds,
        task_data=self.task_data,
        group_names=setup.group_names,
        mesh=self.run.mesh,
        writer=self.writer,
        record=self.record,
        evaluate=self._evaluate,
    )
    self.earlier_wall = self.record.wall_time  # wall time of the sessions before this one

  def _evaluate(self, model, examples=None) -> dict:
    """Scores ``examples`` (None: the stream tasks' ``eval.metric_examples``) with their
    tasks' metrics."""
    results = evaluate(
        model,
        self.task_data.encoder,
        self.analyses.stream_examples if examples is None else examples,
        self.task_data.metrics,
        max_new_tokens=self.config.eval.max_new_tokens,
        batch_size=self.config.eval.batch_size,
        judge=self.judge,
    )
    release_free_memory()  # the KV caches and scoring buffers it freed
    return results

  def _before_training(self) -> None:
    """The plan and the analyses of the untrained model (a fresh run), the progress bar and
    the method's session (``Method.begin_session``)."""
    if not self.step:  # the length of the run, for whoever follows metrics.jsonl (progress)
      left_out = self.task_data.left_out
      plan = {"total_steps": self.bounds[-1], "stages": len(self.stages)}
      self.writer.write("plan", 0, plan | ({"left_out": left_out} if left_out else {}))
      for task, n in left_out.items() if writes_files() else ():
        print(
            f"{task}: {n} training examples left out, their response starts past "
            f"data.seq_len={self.config.data.seq_len}",
            file=sys.stderr,
        )
      self.analyses.before_training(self.method.eval_model(nnx.merge(self.graphdef, self.state)[0]))
      release_free_memory()
    self.progress = tqdm(
        total=self.bounds[-1],
        initial=self.step,
        disable=not self.config.log.progress,
        desc=self.config.method.type,
        dynamic_ncols=True,
    )
    optimizer = nnx.merge(self.graphdef, self.state)[1]
    self.method.begin_session(optimizer, self.record.mask_history)
    self.tokens, self.tick = 0.0, time.perf_counter()

  def run_stages(self) -> None:
    """Trains the stages not yet done, each followed by its evaluation and a checkpoint."""
    self._before_training()
    for k in range(len(self.stages)):
      if self.step >= self.bounds[k + 1]:
        continue
      it = self.iterators[k]
      if self.step > self.bounds[k]:
        data = {key: v for key, v in self.record.data.items() if key != "stage"}
        it.restore(IteratorState(**data))
      while self.step < self.bounds[k + 1]:
        self._train_step(k, it)
      self._end_stage(k, it)
    self.progress.close()

  def _train_step(self, k: int, it) -> None:
    batch = next(it)
    self.state, out = self.step_fn(self.state, put_batch(batch, self.run.mesh))
    self.step += 1
    self.tokens += float(batch["attention_mask"].sum())
    if (stats := self.method.refresh(out)) is not None:
      self._record_refresh(stats)
    if self.step % self.config.log.every == 0 or self.step == self.bounds[k + 1]:
      self._log(k, out)
    self.progress.update(1)
    # analysis time is not training time
    self.tick += self.analyses.after_step(self.step, self.graphdef, self.state)
    every = self.config.checkpoint.every
    if every and self.step % every == 0 and self.step < self.bounds[k + 1]:
      self._save(k, it)

  def _record_refresh(self, stats: dict) -> None:
    """A mask refresh: its record, the analyses that follow refreshes, the mask if kept."""
    self.record.mask_history.append(self.writer.write("mask", self.step, stats))
    self.analyses.after_refresh(self.record.mask_history)
    if self.masks is not None:
      opt_state = nnx.merge(self.graphdef, self.state)[1].opt_state
      self.masks[f"refresh_{self.step}"] = self.method.refreshed_masks(opt_state)

  def _log(self, k: int, out: dict) -> None:
    """The train record of this step; stops the run on a divergence if so configured."""
    jax.block_until_ready(self.state)  # the whole step, not just its loss, for tokens/s
    now = time.perf_counter()
    loss, rate = float(out["loss"]), self.tokens / (now - self.tick)
    self.writer.write(
        "train",
        self.step,
        {"loss": loss, "lr": float(self.schedule(self.step - 1)), "tokens_per_s": rate, "stage": k}
        | self.method.step_record(out),
    )
    self.progress.set_postfix(
        stage=k, loss=f"{loss:.3f}", tok_s=f"{rate:.0f}", protected=f"{self.method.protected:.4f}"
    )
    self.tokens, self.tick = 0.0, now
    if (event := self.divergence.update(self.step, loss)) is not None:
      self.writer.write("divergence", self.step, event)
      print(f"training diverged at step {self.step}: {event['reason']}", file=sys.stderr)
      if self.config.train.on_divergence == "stop":
        _stop_diverged(
            self.run_dir,
            {"method": self.config.method.type, "stages": self.stages, "steps": self.step}
            | {"divergence": event, "wall_time_s": self.earlier_wall + now - self.session_start},
        )

  def _end_stage(self, k: int, it) -> None:
    """Stage ``k``'s evaluation, analyses and method step, then its checkpoint."""
    module, optimizer = nnx.merge(self.graphdef, self.state)
    eval_start = time.perf_counter()
    eval_model = self.method.eval_model(module)
    results = self._evaluate(eval_model)
    row = headline_row(results, self.task_data.metrics)
    scores = {
        "results": results,
        **avg_norm_score(results, self.task_data.metrics),
        "eval_time_s": time.perf_counter() - eval_start,
    }
    self.writer.write("eval", self.step, {"stage": k} | row)
    self.writer.write(
        "eval_metrics",
        self.step,
        {
            "stage": k,
            "avg_norm_score": scores["avg_norm_score"],
            "eval_time_s": scores["eval_time_s"],
        }
        | {f"{task}/{name}": value for task, r in results.items() for name, value in r.items()},
    )
    self.record.matrix.append(row)
    self.record.eval_metrics.append(scores)
    self.analyses.after_stage(k, self.step, eval_model)
    logged = self.method.after_stage(k, module, optimizer, self.run)
    if logged:
      self.writer.write("method", self.step, logged)
    self.state = nnx.state((module, optimizer))
    self._save(k, it)
    self.tick = time.perf_counter()

  def _save(self, stage: int, it) -> None:
    record = self.record
    record.step, record.config = self.step, to_dict(self.config)
    record.data = {"stage": stage, **dataclasses.asdict(it.state)}
    record.wall_time = self.earlier_wall + time.perf_counter() - self.session_start
    self.ckpt.save(self.step, self.state, record, self.masks)
    release_free_memory()  # what the checkpoint writer's threads freed

  def finish(self) -> dict:
    """summary.json, the method's and the model's exports, the closing table; the summary."""
    module, optimizer = nnx.merge(self.graphdef, self.state)
    summary = _summary(
        self.method,
        self.stages,
        self.record,
        module,
        optimizer,
        wall_time=self.earlier_wall + time.perf_counter() - self.session_start,
    )
    summary["analyses"] = self.analyses.summary(self.record)
    summary["divergence"] = self.divergence.event
    self.method.export(module, self.run_dir)
    if self.config.checkpoint.save_model:
      save_model(self.method.eval_model(module), self.config, os.path.join(self.run_dir, MODEL_DIR))
    if writes_files():
      for name, content in {"summary.json": summary, **self.analyses.files()}.items():
        with open(os.path.join(self.run_dir, name), "w") as f:
          json.dump(content, f, indent=1)
    self.writer.close()
    self.ckpt.close()
    print(format_table(self.record.matrix, self.stages, summary["forgetting_ratio"]))
    print(f"wall time {summary['wall_time_s']:.1f}s, params_sha256 {summary['params_sha256']}")
    return summary


def _open_run_dir(
    config: Config, run_dir: str, resume: bool
) -> tuple[RunCheckpoints, int, Judge | None]:
  """The run directory made ready: cleared for a fresh start or checked for a resume, its
  checkpoints, the step to start from, the judge (its cache there) and config.yaml."""
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
  return ckpt, start_step, judge


def train(config: Config, *, run_dir: str | None = None, resume: bool = False) -> dict:
  """Runs (or resumes) the training described by ``config``; returns the summary it writes."""
  run_dir = run_dir or config.run_dir
  session_start = time.perf_counter()
  # Every input is read and checked before the run directory is touched (docs/trainer.md).
  if config.model.checkpoint:
    check_checkpoint(config.model.checkpoint)
  method = make_method(config)
  task_data = load_tasks(config)
  ckpt, start_step, judge = _open_run_dir(config, run_dir, resume)
  session = _Session(  # the setup is not kept: a resumed state replaces its fresh one
      config,
      setup_run(config, method=method, task_data=task_data, resuming=bool(start_step)),
      run_dir=run_dir,
      ckpt=ckpt,
      judge=judge,
      start_step=start_step,
      session_start=session_start,
  )
  session.run_stages()
  return session.finish()
