"""The ``nll`` analysis of a run: every task's (and probe task's) held-out response NLL per
example before training, each stream task's after every stage from its own on, every probe's
after the last stage; the NLL matrix, forgetting and BWT (``epi_jax.eval.nll``), and the
per-example file ``heldout_nll.json``.

The examples are the first ``eval.nll_examples`` held-out examples of each task: they depend
on the data config only (``data.seed``, ``n_eval``; hf: the files, ``n_train``), never on the
method, so runs of different methods of one seed score the same examples. The evaluation
before training is the same for every method of a seed too: with a cache directory it is
stored under a hash of the evaluated model's parameters and config, the examples' tokens and
the batch size, and a later run whose untrained model hashes the same reads it back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

import epi_jax.data as data
from epi_jax.eval.cache import cache_key, cached
from epi_jax.eval.nll import nll_forgetting, nll_row, response_nlls

CACHE_VERSION = 1
"""Part of every cache key; raise it when the NLL computation changes."""


class HeldoutNll:
  """Measures and keeps the per-example NLL of the run's evaluation points.

  Args:
    encoder: the run's chat encoder.
    evaluation: task -> held-out examples, for every stream and probe task.
    stream: the trained tasks; probes: tasks never trained, scored alike.
    examples: how many of each task's held-out examples (the first ones) are scored.
    batch_size: rows per forward pass.
    results: the dict kept in the checkpoint's record: ``before`` and ``after_stage`` (a list
      per finished stage), each task -> ``[nll_sum, tokens]`` per example; ``before_cache``.
  """

  def __init__(
      self,
      encoder: data.ChatEncoder,
      evaluation: Mapping[str, Sequence[data.EvalExample]],
      *,
      stream: Sequence[str],
      probes: Sequence[str],
      examples: int,
      batch_size: int,
      results: dict,
  ):
    self.encoder, self.batch_size, self.results = encoder, batch_size, results
    self.stream, self.probes = list(stream), list(probes)
    self.chats = {}
    for task in self.stream + self.probes:
      held_out = evaluation[task]
      if len(held_out) < examples:
        raise ValueError(
            f"eval.nll_examples={examples}: task {task!r} has only {len(held_out)} held-out "
            "examples"
        )
      self.chats[task] = [e.turns for e in held_out[:examples]]

  def examples_digest(self) -> str:
    """SHA-256 over every scored example's task, token ids and loss mask, in order."""
    digest = hashlib.sha256()
    for task, chats in self.chats.items():
      digest.update(task.encode() + b"\0")
      for chat in chats:
        ids, mask = self.encoder.encode_chat(chat)
        digest.update(np.asarray(ids, np.int64).tobytes() + np.asarray(mask, bool).tobytes())
    return digest.hexdigest()

  def cache_key(self, params_digest: str, model_config: str) -> str:
    """The before-training cache key of a model with these parameters and config."""
    return cache_key(
        CACHE_VERSION, params_digest, model_config, self.examples_digest(), self.batch_size
    )

  def measure(self, model, tasks: Sequence[str] | None = None) -> dict[str, list[list[float]]]:
    """task -> ``[nll_sum, tokens]`` per example of ``tasks`` (None: every stream and probe
    task), their chats in one batched pass."""
    tasks = list(self.chats) if tasks is None else tasks
    chats = [chat for task in tasks for chat in self.chats[task]]
    scores = response_nlls(model, self.encoder, chats, batch_size=self.batch_size)
    out, start = {}, 0
    for task in tasks:
      count = len(self.chats[task])
      out[task], start = scores[start : start + count], start + count
    return out

  def before_training(self, model, *, cache_dir: str, key: Callable[[], str], writes: bool):
    """Scores the untrained model, or reads the scores of an identical one from ``cache_dir``.

    Args:
      model: the evaluated (untrained) model.
      cache_dir: where cached evaluations live; "" for none.
      key: computes the cache key (``cache_key``); called only with a cache directory.
      writes: whether this process writes the cache file.
    """
    self.results["before"], self.results["before_cache"] = cached(
        cache_dir, "heldout_nll", key, lambda: self.measure(model), writes=writes
    )

  def after_stage(self, model, stages: Sequence[Sequence[str]]) -> dict[str, float | None]:
    """Scores the model after the next of ``stages`` on the stream tasks seen so far, and
    after the last stage on the probes too; returns the task means (the matrix row)."""
    k = len(self.results.get("after_stage", []))
    seen = {t for stage in stages[: k + 1] for t in stage}
    tasks = [t for t in self.stream if t in seen] + (self.probes if k == len(stages) - 1 else [])
    self.results.setdefault("after_stage", []).append(self.measure(model, tasks))
    return nll_row(self.results["after_stage"][-1])

  def points(self) -> list[tuple[str, dict]]:
    """(label, task -> per-example scores) of every point measured: before, after_stage_k."""
    out = [("before", self.results["before"])] if "before" in self.results else []
    return out + [
        (f"after_stage_{k}", p) for k, p in enumerate(self.results.get("after_stage", []))
    ]

  def summary(self, stages: Sequence[Sequence[str]]) -> dict:
    """The ``analyses.nll`` entry of summary.json."""
    before = nll_row(self.results["before"]) if "before" in self.results else None
    after = [  # a task not yet seen was not scored: None
        {t: nll_row(p).get(t) for t in self.chats} for p in self.results.get("after_stage", [])
    ]
    out = {
        "examples_per_task": {t: len(c) for t, c in self.chats.items()},
        "probe_tasks": self.probes,
        "matrix": (
            ([{"point": "before", "trained": [], "nll": before}] if before else [])
            + [
                {"point": f"after_stage_{k}", "trained": list(stages[k]), "nll": row}
                for k, row in enumerate(after)
            ]
        ),
        "before_cache": self.results.get("before_cache"),
    }
    if after and before:
      out |= nll_forgetting(before, after, stages)
      out["probe"] = {
          t: {"before": before[t], "after": after[-1][t], "change": out["change_from_before"][t]}
          for t in self.probes
      }
    return out

  def per_example(self, stages: Sequence[Sequence[str]]) -> dict:
    """The content of ``heldout_nll.json``: one record per (point, task, example)."""
    return {
        "tasks": self.stream,
        "probe_tasks": self.probes,
        "stages": [list(s) for s in stages],
        "points": [label for label, _ in self.points()],
        "records": [
            {"point": label, "task": task, "index": i, "nll_sum": s, "tokens": n}
            for label, point in self.points()
            for task, scores in point.items()
            for i, (s, n) in enumerate(scores)
        ],
    }
