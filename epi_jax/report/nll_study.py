"""Loss-based forgetting of finished runs, method against method: the per-example quantities
read from each run's ``heldout_nll.json`` (the ``nll`` analysis), their paired differences over
seeds and examples (``epi_jax.eval.paired``) and each task's NLL over the stages with bands.

Runs of two groups are paired by seed ((data.seed, train.seed)): the same seed scores the same
held-out examples under every method (``epi_jax.eval.heldout_nll``), which is checked here by
the examples' token counts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from epi_jax.eval.paired import bootstrap_means, paired_difference
from epi_jax.report.runs import FinishedRun, RunError

HELDOUT_NLL = "heldout_nll.json"
CONFIDENCE = 0.95
RESAMPLES = 10_000

QUANTITIES = {
    # name: (title, what a negative difference of "A - B" means)
    "forgetting": ("stream forgetting (nats/token)", "forgets less"),
    "final": ("final stream NLL (nats/token)", "ends with a lower NLL"),
    "probe": ("general-ability change (nats/token)", "loses less general ability"),
}
"""The per-example quantities compared (``per_example``)."""


@dataclasses.dataclass(frozen=True)
class HeldoutScores:
  """One run's ``heldout_nll.json``: per-token NLL of each example at each point."""

  stream: list[str]  # the trained tasks
  probes: list[str]  # tasks never trained
  stages: list[list[str]]
  points: list[str]  # "before", "after_stage_0", ...
  per_token: dict[str, dict[str, np.ndarray]]  # point -> task -> nll_sum / tokens per example
  tokens: dict[str, np.ndarray]  # task -> response tokens per example (names the examples)


def read_heldout(run: FinishedRun) -> HeldoutScores | None:
  """The run's per-example NLL, or None when it has no ``heldout_nll.json``.

  Raises:
    RunError: the file is malformed or an example has no response tokens.
  """
  path = os.path.join(run.run_dir, HELDOUT_NLL)
  if not os.path.exists(path):
    return None
  # The report reads each run's file for several tables: once per file version.
  return _read_file(path, os.stat(path).st_mtime_ns)


@functools.cache
def _read_file(path: str, mtime_ns: int) -> HeldoutScores:
  """``read_heldout`` of the file at ``path`` as it was at ``mtime_ns``."""
  del mtime_ns  # part of the cache key only
  try:
    with open(path) as f:
      raw = json.load(f)
    values: dict[str, dict[str, dict[int, tuple[float, int]]]] = {}
    for r in raw["records"]:
      values.setdefault(r["point"], {}).setdefault(r["task"], {})[r["index"]] = (
          r["nll_sum"],
          r["tokens"],
      )
    tokens, per_token = {}, {}
    for point, tasks in values.items():
      per_token[point] = {}
      for task, by_index in tasks.items():
        pairs = np.array([by_index[i] for i in range(len(by_index))], np.float64)
        if np.any(pairs[:, 1] <= 0):
          raise RunError(f"{path}: an example of {task} has no response tokens")
        if task in tokens and not np.array_equal(tokens[task], pairs[:, 1]):
          raise RunError(f"{path}: the {task} examples differ between evaluation points")
        tokens[task] = pairs[:, 1]
        per_token[point][task] = pairs[:, 0] / pairs[:, 1]
    return HeldoutScores(
        stream=list(raw["tasks"]),
        probes=list(raw["probe_tasks"]),
        stages=[list(s) for s in raw["stages"]],
        points=list(raw["points"]),
        per_token=per_token,
        tokens=tokens,
    )
  except RunError:
    raise
  except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
    raise RunError(f"{path}: unreadable per-example NLL ({error!r})") from None


def per_task(scores: HeldoutScores, quantity: str) -> dict[str, np.ndarray] | None:
  """task -> a quantity per example of the task:

  - ``forgetting``: the tasks trained before the last stage; NLL at the end of the stream
    minus NLL at the end of the task's own stage (None with a single stage);
  - ``final``: every stream task's NLL at the end of the stream;
  - ``probe``: every probe task's NLL at the end minus before training (None without probes).
  """
  final = scores.per_token[scores.points[-1]]
  if quantity == "forgetting":
    if len(scores.stages) < 2 or f"after_stage_{len(scores.stages) - 1}" not in scores.per_token:
      return None
    own = {t: k for k, stage in enumerate(scores.stages[:-1]) for t in stage}
    return {
        t: final[t] - scores.per_token[f"after_stage_{own[t]}"][t]
        for t in scores.stream
        if t in own
    }
  if quantity == "final":
    return {t: final[t] for t in scores.stream}
  if quantity == "probe":
    if not scores.probes or "before" not in scores.per_token:
      return None
    return {t: final[t] - scores.per_token["before"][t] for t in scores.probes}
  raise ValueError(f"unknown quantity {quantity!r}; known: {', '.join(QUANTITIES)}")


def per_example(scores: HeldoutScores, quantity: str) -> tuple[np.ndarray, list[str]] | None:
  """``per_task``'s values, the tasks' examples one after the other, with those tasks."""
  by_task = per_task(scores, quantity)
  if by_task is None:
    return None
  return np.concatenate(list(by_task.values())), list(by_task)


def _interval(values: np.ndarray) -> tuple[float, float, float]:
  """(mean, low, high) of [seeds, examples] values: the mean and its hierarchical bootstrap
  interval."""
  draws = bootstrap_means(values, resamples=RESAMPLES, seed=0)
  tail = (1 - CONFIDENCE) / 2
  low, high = np.quantile(draws, [tail, 1 - tail])
  return float(values.mean()), float(low), float(high)


def task_intervals(runs: Sequence[FinishedRun], quantity: str) -> dict[str, tuple[float, ...]]:
  """task -> (mean, low, high) of ``quantity`` over a group's runs (seeds) and examples: e.g.
  how much sequential SFT forgot each task, with its interval (the calibration's check). A task
  counts the seeds that measured it (random grouping: its stage, so whether it is forgotten,
  changes with the seed)."""
  by_seed = [per_task(s, quantity) for _, s in _by_seed(runs).values()]
  if not by_seed or any(b is None for b in by_seed):
    return {}
  tasks = list(dict.fromkeys(t for b in by_seed for t in b))
  return {t: _interval(np.stack([b[t] for b in by_seed if t in b])) for t in tasks}


def _by_seed(
    runs: Sequence[FinishedRun],
) -> dict[tuple[int, int], tuple[FinishedRun, HeldoutScores]]:
  out = {}
  for run in runs:
    scores = read_heldout(run)
    if scores is not None:
      out[run.seeds] = (run, scores)
  return out


def _same_examples(
    a: tuple[FinishedRun, HeldoutScores], b: tuple[FinishedRun, HeldoutScores], tasks
) -> None:
  for task in tasks:
    if not np.array_equal(a[1].tokens.get(task), b[1].tokens.get(task)):
      raise RunError(
          f"{a[0].run_dir} and {b[0].run_dir}: same seed, but their held-out {task} examples "
          "differ (data config or eval.nll_examples): they cannot be paired"
      )


def paired_rows(groups: Mapping[str, Sequence[FinishedRun]], reference: str) -> list[dict]:
  """``reference`` minus every other group, per quantity both sides have, over their common
  seeds: the ``PairedDifference`` fields with ``reference``, ``other``, ``quantity``, ``tasks``.
  """
  ref = _by_seed(groups[reference])
  rows = []
  for label, members in groups.items():
    other = _by_seed(members)
    seeds = sorted(set(ref) & set(other)) if label != reference else []
    for quantity in QUANTITIES:
      pairs = [
          (per_example(ref[s][1], quantity), per_example(other[s][1], quantity)) for s in seeds
      ]
      if not pairs or any(a is None or b is None or a[1] != b[1] for a, b in pairs):
        continue
      for s in seeds:
        _same_examples(ref[s], other[s], pairs[0][0][1])
      difference = paired_difference(
          np.stack([a[0] for a, _ in pairs]),
          np.stack([b[0] for _, b in pairs]),
          confidence=CONFIDENCE,
          resamples=RESAMPLES,
      )
      rows.append(
          {"reference": reference, "other": label, "quantity": quantity, "tasks": pairs[0][0][1]}
          | difference.as_dict()
      )
  return rows


def reading(row: Mapping) -> str:
  """The verdict of a paired row in words; one seed gives a direction, not a verdict."""
  better = QUANTITIES[row["quantity"]][1]
  worse = better.replace("less", "more").replace("lower", "higher")
  if row["seeds"] < 2:
    side = better if row["mean"] < 0 else worse
    return f"direction only (1 seed): {row['reference']} {side}"
  if row["verdict"] == "cannot tell":
    return "cannot tell (0 inside the interval)"
  return f"{row['reference']} {better if row['verdict'] == 'less' else worse}"


def nll_bands(runs: Sequence[FinishedRun], stages: int) -> dict[str, list[tuple[float, ...]]]:
  """task -> (x, mean, low, high) per evaluation point of a group's runs: the mean over seeds
  of the task's NLL and its hierarchical bootstrap interval (seeds, then examples). x is 0
  before training and (k + 1) * stages / K after stage k of K, so that a one-stage run's only
  point sits at the end of a ``stages``-stage stream."""
  by_seed = [s for _, s in _by_seed(runs).values()]
  if not by_seed:
    return {}
  first = by_seed[0]
  out: dict[str, list[tuple[float, ...]]] = {}
  for point in first.points:
    x = (
        0.0
        if point == "before"
        else (int(point.rsplit("_", 1)[1]) + 1) * stages / len(first.stages)
    )
    for task in first.stream + first.probes:
      if not all(point in s.per_token and task in s.per_token[point] for s in by_seed):
        continue
      values = np.stack([s.per_token[point][task] for s in by_seed])
      out.setdefault(task, []).append((x, *_interval(values)))
  return out
