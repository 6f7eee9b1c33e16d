"""The analyses a run switches on with ``eval.analyses`` (docs/evaluation.md, "Analyses"): the
training loop's hook around the pure analyses of ``epi_jax.eval``.

``RunAnalyses`` is what the training loop calls: once before training, after each mask refresh,
after every step (it acts only at the perturbation points) and after each stage's evaluation;
``summary`` gives the ``analyses`` entry of summary.json. Each result is written to metrics.jsonl
(and TensorBoard) when it is measured. What a resumed session needs lives in the checkpoint's
record (``RunRecord.analyses``); the flip rates are recomputed from the mask history. No
analysis touches the training state, the data order or any random stream of the training.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

import epi_jax
import epi_jax.data as data
from epi_jax.eval.cache import cache_key, cached
from epi_jax.eval.continual import continual_summary, probe_forgetting
from epi_jax.eval.gradient_conflict import task_gradient_conflict
from epi_jax.eval.heldout import heldout_batch, mean_loss
from epi_jax.eval.heldout_nll import HeldoutNll
from epi_jax.eval.metrics import headline_row
from epi_jax.eval.mask_drift import flip_rates, refresh_flip_rates
from epi_jax.eval.nll import nll_row
from epi_jax.eval.perturbation import importance_vs_perturbation
from epi_jax.eval.task_overlap import task_overlap
from epi_jax.train.checkpointing import params_sha256
from epi_jax.train.config import Config
from epi_jax.train.distributed import writes_files
from epi_jax.train.setup import num_micro_batches
from epi_jax.train.sharding import put_batch
from epi_jax.train.tasks import TaskData
from epi_jax.train.writer import MetricsWriter

PERTURBATION_POINTS = (("early", 0.25), ("middle", 0.5), ("late", 1.0))
"""Training progress of the perturbation analysis (the step round(fraction * total), >= 1)."""
PERTURBATION_PER_GROUP = 16
"""Entries sampled from every normalization group."""
PERTURBATION_DRAWS = 2
"""Gaussian draws per entry, each evaluated at +eps and -eps."""
PERTURBATION_SIGMA_REL = 1.0
"""sigma of eps over the root mean square of all parameters: one entry moved by a typical
parameter's size; much smaller steps fall below the float32 resolution of the loss."""
PERTURBATION_MEMORY = 512 * 2**20
"""Bytes for the perturbations evaluated at once (parameter copies and logits, estimated)."""
SCORES_CACHE_VERSION = 1
"""Part of the key of cached before-training scores; raise it when the metrics change."""
IMPORTANCE_BATCHES = 4
"""Training batches of each task in its importance EMA (task_overlap)."""


class RunAnalyses:
  """The analyses of one run, switched by ``config.eval.analyses``.

  Args:
    config: the run's config.
    stages: the tasks of each stage; bounds: stage k runs steps bounds[k]+1 .. bounds[k+1].
    task_data: the run's tokenized training examples and held-out examples.
    group_names: the normalization groups of the parameters (``layer_groups(...).names``).
    mesh: where batches go (``put_batch``).
    writer: the run's metrics writer.
    record: the run's RunRecord; results are kept in ``record.analyses``.
    evaluate: ``evaluate(model, examples)`` scores held-out examples with their tasks' metrics
      (the loop's own evaluation; ``examples`` None: the stream tasks').
  """

  def __init__(
      self,
      config: Config,
      *,
      stages: Sequence[Sequence[str]],
      bounds: Sequence[int],
      task_data: TaskData,
      group_names: Sequence[str],
      mesh,
      writer: MetricsWriter,
      record,
      evaluate: Callable,
  ):
    self.names = tuple(config.eval.analyses)
    self.config, self.stages, self.bounds = config, [list(s) for s in stages], list(bounds)
    self.group_names, self.mesh, self.writer = list(group_names), mesh, writer
    self.results = record.analyses
    self.encoder, self.metrics = task_data.encoder, task_data.metrics
    self.evaluate = evaluate
    # continual: the probe tasks' own metrics before training and after the last stage (the
    # skills of the base model no stage trains: what the whole stream cost them).
    scored = config.eval.metric_examples or config.data.n_eval
    self.stream_examples = {t: examples[:scored] for t, examples in task_data.evaluation.items()}
    self.probe_examples = (
        {t: examples[:scored] for t, examples in task_data.probes.items()}
        if "continual" in self.names
        else {}
    )
    self.chats = {t: [e.turns for e in examples] for t, examples in task_data.evaluation.items()}
    o, d = config.optim, config.data
    self.num_micro = num_micro_batches(o)
    self.heldout = (
        {
            t: heldout_batch(self.encoder, self.chats, [t], rows=o.batch_size, seq_len=d.seq_len)
            for t in self.chats
        }
        if "gradient_conflict" in self.names
        else {}
    )
    self.task_batches = {}
    if "task_overlap" in self.names:
      for t in self.chats:
        it = data.BatchIterator(
            task_data.train[t],
            batch_size=o.batch_size,
            seq_len=d.seq_len,
            pad_id=self.encoder.pad_id,
            seed=d.seed,
            pack=d.pack,
            pack_window=d.pack_window,
        )
        self.task_batches[t] = [next(it) for _ in range(IMPORTANCE_BATCHES)]
    self.points: dict[int, list[str]] = {}
    if "perturbation" in self.names:
      for label, fraction in PERTURBATION_POINTS:
        self.points.setdefault(max(1, round(fraction * self.bounds[-1])), []).append(label)
    self._loss_fn: Callable | None = None
    self.nll = (
        HeldoutNll(
            self.encoder,
            task_data.evaluation | task_data.probes,
            stream=config.data.tasks,
            probes=config.eval.probe_tasks,
            examples=config.eval.nll_examples or d.n_eval,
            batch_size=config.eval.batch_size,
            results=self.results.setdefault("nll", {}),
        )
        if "nll" in self.names
        else None
    )

  def before_training(self, model) -> None:
    """On the untrained (evaluated) model: with ``continual``, the scores (FWT's reference
    row) and the probe tasks'; with ``nll``, the per-example NLL; each read from
    ``eval.nll_cache`` when there."""
    digest = functools.cache(lambda: params_sha256(nnx.state(model, nnx.Param)))
    if "continual" in self.names and "before" not in self.results:
      scores, info = cached(
          self.config.eval.nll_cache,
          "scores",
          lambda: self._scores_key(digest(), repr(model.config)),
          lambda: self._scores_before(model),
          writes=writes_files(),
      )
      self.results.update(scores, before_time_s=info["time_s"], before_cache=info)
      self.writer.write("eval_before", 0, self.results["before"])
      if self.probe_examples:
        self.writer.write("eval_probes", 0, self.results["probes_before"])
    if self.nll is not None and "before" not in self.nll.results:
      self.nll.before_training(
          model,
          cache_dir=self.config.eval.nll_cache,
          key=lambda: self.nll.cache_key(digest(), repr(model.config)),
          writes=writes_files(),
      )
      self.writer.write("nll_before", 0, nll_row(self.nll.results["before"]))

  def after_refresh(self, history: Sequence[dict]) -> None:
    """With ``flip_rate``: log the per-group flip rate of the refresh just recorded."""
    if "flip_rate" in self.names and len(history) >= 2:
      self.writer.write("flip_rate", history[-1]["step"], {"rate": refresh_flip_rates(history[-1])})

  def after_step(self, step: int, graphdef, state) -> float:
    """With ``perturbation``: at its points, correlate S with measured loss changes.

    Returns the seconds it took (0.0 at other steps).
    """
    labels = self.points.get(step)
    if not labels:
      return 0.0
    start = time.perf_counter()
    model, optimizer = nnx.merge(graphdef, state)
    stage = int(np.searchsorted(self.bounds[1:], step))
    # The old tasks: those of the finished stages; inside the first stage, its own tasks.
    old = [t for s in self.stages[:stage] for t in s] or self.stages[0]
    o = self.config.optim
    rows = o.micro_batch_size or o.batch_size
    batch = put_batch(
        heldout_batch(self.encoder, self.chats, old, rows=rows, seq_len=self.config.data.seq_len),
        self.mesh,
    )
    model_def, params, rest = nnx.split(model, nnx.Param, ...)
    if self._loss_fn is None:  # one function object: its compiled program is reused
      self._loss_fn = lambda p, aux: mean_loss(nnx.merge(model_def, p, aux[0]), aux[1], 1)
    per_lane = (
        sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
        + 12 * rows * self.config.data.seq_len * model.config.vocab_size
    )
    result = importance_vs_perturbation(
        self._loss_fn,
        params,
        (rest, batch),
        epi_jax.sensitivity_of(optimizer.opt_state),
        per_group=PERTURBATION_PER_GROUP,
        draws=PERTURBATION_DRAWS,
        sigma_rel=PERTURBATION_SIGMA_REL,
        seed=self.config.train.seed + step,
        layer_of=self.config.method.layer_of,
        chunk=int(np.clip(PERTURBATION_MEMORY // per_lane, 1, 64)),
    )
    result |= {
        "step": step,
        "stage": stage,
        "old_tasks": old,
        "time_s": time.perf_counter() - start,
    }
    for label in labels:
      self.results.setdefault("perturbation", {})[label] = result
      self.writer.write(
          "perturbation",
          step,
          {"point": label} | {k: v for k, v in result.items() if k != "old_tasks"},
      )
    return time.perf_counter() - start

  def after_stage(self, stage: int, step: int, model) -> None:
    """With ``nll`` / ``gradient_conflict`` / ``task_overlap``: measure them on the model as it
    is."""
    m = self.config.method
    if self.probe_examples and stage == len(self.stages) - 1:
      self.results["probes_after"] = self._score(model, self.probe_examples)
      self.writer.write("eval_probes", step, self.results["probes_after"])
    if self.nll is not None:
      start = time.perf_counter()
      row = self.nll.after_stage(model, self.stages)
      self.writer.write("nll", step, {"stage": stage, "time_s": time.perf_counter() - start} | row)
    if "gradient_conflict" in self.names:
      start = time.perf_counter()
      result = task_gradient_conflict(
          model,
          {t: put_batch(b, self.mesh) for t, b in self.heldout.items()},
          num_micro=self.num_micro,
      )
      self._record("gradient_conflict", stage, step, result, start)
    if "task_overlap" in self.names:
      start = time.perf_counter()
      result = task_overlap(
          model,
          {t: [put_batch(b, self.mesh) for b in bs] for t, bs in self.task_batches.items()},
          p=m.p,
          beta=m.beta,
          normalize=m.normalize,
          budget=m.budget,
          layer_of=m.layer_of,
          num_micro=self.num_micro,
      )
      self._record("task_overlap", stage, step, result, start)

  def _scores_before(self, model) -> dict:
    """continual's scores of the untrained model: the stream tasks' and the probes'."""
    out = {"before": self._score(model, self.stream_examples)}
    if self.probe_examples:
      out["probes_before"] = self._score(model, self.probe_examples)
    return out

  def _scores_key(self, params_digest: str, model_config: str) -> str:
    """The cache key of continual's before-training scores: the model, the examples as the
    model reads them, their metrics and the generation settings."""
    digest = hashlib.sha256()
    for task, examples in (self.stream_examples | self.probe_examples).items():
      digest.update(json.dumps([task, self.metrics[task]]).encode())
      for e in examples:
        digest.update(np.asarray(self.encoder.encode_prompt(e.prompt), np.int64).tobytes())
        digest.update(json.dumps([e.turns[-1]["content"], list(e.choices), e.answer]).encode())
    e = self.config.eval
    return cache_key(
        SCORES_CACHE_VERSION,
        params_digest,
        model_config,
        digest.hexdigest(),
        e.max_new_tokens,
        e.batch_size,
        e.judge.url,
        e.judge.model,
    )

  def _score(self, model, examples=None) -> dict[str, float | None]:
    """Each task's headline score of ``examples`` (None: the stream tasks')."""
    return headline_row(self.evaluate(model, examples), self.metrics)

  def _record(self, name: str, stage: int, step: int, result: dict, start: float) -> None:
    result = {"after_stage": stage, "step": step, **result, "time_s": time.perf_counter() - start}
    self.results.setdefault(name, []).append(result)
    self.writer.write(
        name,
        step,
        {"stage": stage, "average": result["average"], "time_s": result["time_s"]}
        | result["pairs"],
    )

  def summary(self, record) -> dict:
    """The ``analyses`` entry of summary.json; also logs the continual-learning scalars."""
    out = {}
    if "continual" in self.names:
      before = self.results.get("before")
      out["continual"] = {
          "before": before,
          "before_time_s": self.results.get("before_time_s"),
          "before_cache": self.results.get("before_cache"),
          **continual_summary(before, record.matrix, self.stages),
      }
      if self.probe_examples:
        out["continual"]["probes"] = probe_forgetting(
            self.results.get("probes_before"), self.results.get("probes_after")
        )
      self.writer.write(
          "continual",
          record.step,
          {
              k: out["continual"][k]
              for k in ("acc", "bwt", "fwt", "max_forgetting", "forgetting_ratio_mean")
          },
      )
    for name in ("gradient_conflict", "task_overlap"):
      if name in self.names:
        per_stage = self.results.get(name, [])
        out[name] = {"final": per_stage[-1] if per_stage else None, "per_stage": per_stage}
    if "flip_rate" in self.names:
      out["flip_rate"] = flip_rates(record.mask_history, self.group_names)
    if "perturbation" in self.names:
      out["perturbation"] = self.results.get("perturbation", {})
    if self.nll is not None:
      out["nll"] = self.nll.summary(self.stages)
      self.writer.write("nll_forgetting", record.step, {"bwt": out["nll"].get("bwt")})
    return out

  def files(self) -> dict[str, dict]:
    """JSON files for the run directory: ``heldout_nll.json`` with ``nll``."""
    return {"heldout_nll.json": self.nll.per_example(self.stages)} if self.nll is not None else {}
