"""Finished runs read back from their directories, grouped over seeds and aggregated.

Every number here comes from a run's ``summary.json`` (and ``metrics.jsonl`` for the curves);
nothing is recomputed from checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import yaml

from epi_jax.errors import InputError

LEARNED = 0.5
"""A task counts as learned when its score right after its own stage reaches this."""
SEED_KEYS = ("run_dir", "data.seed", "train.seed")
"""Config keys in which runs of one group may differ."""
LABEL_KEYS = 3
"""A derived group label names at most this many config keys."""
SUMMARY_KEYS = (
    "method",
    "stages",
    "accuracy_matrix",
    "final_accuracy",
    "avg_norm_score",
    "forgetting_ratio",
    "mask_history",
    "wall_time_s",
)
"""The summary.json entries the report reads."""


class RunError(InputError, ValueError):
  """A run directory the report cannot read; the message names the run and the file."""


@dataclasses.dataclass(frozen=True)
class FinishedRun:
  """One finished run as it is on disk."""

  run_dir: str
  """The directory it was read from."""
  config: dict
  """config.yaml: the resolved config."""
  summary: dict
  """summary.json."""
  records: list[dict]
  """metrics.jsonl, one dict per line, in order."""

  @property
  def method(self) -> str:
    return self.summary["method"]

  @property
  def seeds(self) -> tuple[int, int]:
    """(data.seed, train.seed)."""
    return self.config["data"]["seed"], self.config["train"]["seed"]

  def kind(self, name: str) -> list[dict]:
    """The metrics.jsonl records of kind ``name``."""
    return [r for r in self.records if r.get("kind") == name]


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except json.JSONDecodeError as e:
    raise RunError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise RunError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def _read_records(path: str) -> list[dict]:
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise RunError(f"{path}:{number}: not valid JSON ({e})") from None
      if not isinstance(record, dict) or "kind" not in record or "step" not in record:
        raise RunError(f"{path}:{number}: a record needs 'kind' and 'step', got {line.strip()!r}")
      records.append(record)
  return records


def load_run(run_dir: str) -> FinishedRun:
  """Reads a finished run: ``config.yaml``, ``summary.json`` and ``metrics.jsonl``.

  Raises:
    RunError: naming the run and the file, when the directory or a file is missing (no
      summary.json: the run has not finished) or malformed.
  """
  if not os.path.isdir(run_dir):
    raise RunError(f"{run_dir}: not a directory")
  paths = {
      name: os.path.join(run_dir, name) for name in ("config.yaml", "summary.json", "metrics.jsonl")
  }
  if not os.path.exists(paths["summary.json"]):
    raise RunError(
        f"{run_dir}: no summary.json: the run has not finished (or is not a run " "directory)"
    )
  for path in paths.values():
    if not os.path.exists(path):
      raise RunError(f"{path}: missing")
  try:
    with open(paths["config.yaml"]) as f:
      config = yaml.safe_load(f)
  except yaml.YAMLError as e:
    raise RunError(f"{paths['config.yaml']}: not valid YAML ({e})") from None
  problems = [] if isinstance(config, dict) else ["expected a mapping"]
  for section, key in (("data", "seed"), ("train", "seed"), ("method", "type")):
    if not problems and key not in (config.get(section) or {}):
      problems.append(f"no {section}.{key}")
  if problems:
    raise RunError(f"{paths['config.yaml']}: {'; '.join(problems)}")
  summary = _read_json(paths["summary.json"])
  if (summary.get("divergence") or {}).get("reason") and "final_accuracy" not in summary:
    event = summary["divergence"]
    raise RunError(
        f"{paths['summary.json']}: the run diverged at step {event.get('step')} "
        f"({event['reason']}) and was stopped"
    )
  missing = [key for key in SUMMARY_KEYS if key not in summary]
  if missing:
    raise RunError(f"{paths['summary.json']}: missing {', '.join(missing)}")
  return FinishedRun(
      run_dir=run_dir, config=config, summary=summary, records=_read_records(paths["metrics.jsonl"])
  )


def _flat(config: Mapping, prefix: str = "") -> dict:
  """Dotted key -> value of a nested config (lists stay values)."""
  out = {}
  for key, value in config.items():
    if isinstance(value, Mapping):
      out |= _flat(value, f"{prefix}{key}.")
    else:
      out[f"{prefix}{key}"] = value
  return out


PER_SEED_BASE = re.compile(r"(^|/)base/[0-9a-f]{16}/model$")
"""The base model the replication runner trains for each seed (``Preset.base``): part of the seed."""


def _comparable(config: dict) -> dict:
  """The flat config without what a seed changes (SEED_KEYS, the seed's own base model); a key
  the run's config lacks (a field added since) reads as its default."""
  from epi_jax.train.config import Config

  full = _flat(dataclasses.asdict(Config())) | _flat(config)
  flat = {k: v for k, v in full.items() if k not in SEED_KEYS}
  if PER_SEED_BASE.search(str(flat.get("model.checkpoint", ""))):
    flat["model.checkpoint"] = "the seed's base model"
  return flat


def _group_key(run: FinishedRun) -> str:
  return json.dumps(_comparable(run.config), sort_keys=True, default=str)


def _text(value) -> str:
  return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _derived_labels(configs: Sequence[dict]) -> list[str]:
  """Per group: its method, then each config key whose value differs from the most common
  value among the groups (so two groups never get the same label); past LABEL_KEYS such keys
  the label ends with their count and the group's number."""
  flats = [_comparable(c) for c in configs]
  keys = sorted({k for f in flats for k in f} - {"method.type"})
  common = {}
  for key in keys:
    values = [_text(f.get(key)) for f in flats]
    if len(set(values)) > 1:
      common[key] = Counter(values).most_common(1)[0][0]
  labels = []
  for number, f in enumerate(flats, 1):
    parts = [
        f"{k.removeprefix('method.')}={_text(f.get(k))}"
        for k, mode in common.items()
        if _text(f.get(k)) != mode
    ]
    if len(parts) > LABEL_KEYS:
      parts = parts[:LABEL_KEYS] + [f"+{len(parts) - LABEL_KEYS} keys (group {number})"]
    labels.append(", ".join([str(f["method.type"])] + parts))
  return labels


def group_runs(
    runs: Iterable[FinishedRun], labels: Mapping[str, str] | None = None
) -> dict[str, list[FinishedRun]]:
  """Runs whose configs differ only in data.seed, train.seed and run_dir, by group label.

  Args:
    runs: loaded runs.
    labels: optional run_dir -> label. Runs of one config with different labels (e.g. one
      setting that two tables of a grid share) form separate groups. Unlabelled groups are
      labelled by their method and the config keys in which they differ from the other
      groups (the most common value is left out).

  Returns:
    label -> runs, groups in the order of their first run, runs in the given order.

  Raises:
    ValueError: one label for runs of different configs.
  """
  labels = labels or {}
  groups: dict[tuple[str, str | None], list[FinishedRun]] = {}
  for run in runs:
    groups.setdefault((_group_key(run), labels.get(run.run_dir)), []).append(run)
  derived = _derived_labels([members[0].config for members in groups.values()])
  out: dict[str, list[FinishedRun]] = {}
  for ((_, given), members), fallback in zip(groups.items(), derived):
    label = fallback if given is None else given
    if label in out:
      raise ValueError(
          f"labels: {label!r} names runs of different configs: "
          f"{out[label][0].run_dir} and {members[0].run_dir}"
      )
    out[label] = members
  return out


def _mean(values: Iterable[float | None]) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def learned_scores(summary: Mapping) -> dict[str, float | None]:
  """Task -> its score right after the first stage that trained it (the accuracy matrix's
  diagonal)."""
  out = {}
  for row in summary["accuracy_matrix"]:
    for task in row["trained"]:
      out.setdefault(task, row["accuracy"].get(task))
  return out


def run_metrics(run: FinishedRun) -> dict:
  """The report's numbers of one run, from its summary.json.

  Returns:
    ``final_accuracy`` and ``learned`` (task -> score), ``mean_final_accuracy`` (over the
    tasks), ``avg_norm_score``, ``acc`` and ``bwt`` (analyses.continual; None without it),
    ``forgetting_ratio_mean`` (mean FR in % of the tasks trained before the last stage, None
    where undefined), ``base_forgetting_ratio_mean`` (the probe tasks' mean FR in % from before
    training to the end: the base model's own skills; None without probes),
    ``protected_fraction`` (static, epi; else None), ``wall_time_s`` and
    ``all_learned`` (every task's learned score >= LEARNED; None if one is missing).
  """
  s = run.summary
  continual = s.get("analyses", {}).get("continual") or {}
  last = set(s["accuracy_matrix"][-1]["trained"])
  learned = learned_scores(s)
  return {
      "final_accuracy": dict(s["final_accuracy"]),
      "mean_final_accuracy": _mean(s["final_accuracy"].values()),
      "avg_norm_score": s["avg_norm_score"]["avg_norm_score"],
      "acc": continual.get("acc"),
      "bwt": continual.get("bwt"),
      "forgetting_ratio_mean": _mean(v for t, v in s["forgetting_ratio"].items() if t not in last),
      "base_forgetting_ratio_mean": (continual.get("probes") or {}).get("forgetting_ratio_mean"),
      "learned": learned,
      "all_learned": (
          None if None in learned.values() else all(v >= LEARNED for v in learned.values())
      ),
      "protected_fraction": s.get("protected_fraction"),
      "wall_time_s": s["wall_time_s"],
  }


def stats(values: Sequence[float | None]) -> dict:
  """mean, std (sample, ddof=1; 0 with one value) and n of the values that are not None."""
  present = [v for v in values if v is not None]
  if not present:
    return {"mean": None, "std": None, "n": 0, "values": list(values)}
  std = float(np.std(present, ddof=1)) if len(present) > 1 else 0.0
  return {"mean": float(np.mean(present)), "std": std, "n": len(present), "values": list(values)}


def aggregate(runs: Sequence[FinishedRun]) -> dict:
  """The numbers of ``run_metrics`` over the seeds of one group, as plain dicts.

  Returns:
    ``n`` (runs), ``run_dirs``, ``seeds`` ([data.seed, train.seed] per run), ``method``, and
    per number of ``run_metrics`` its ``stats`` (per task for ``final_accuracy`` and ``learned``);
    ``all_learned`` is True when every task reached LEARNED in every run.
  """
  if not runs:
    raise ValueError("aggregate: no runs")
  per_run = [run_metrics(r) for r in runs]
  out = {
      "n": len(runs),
      "run_dirs": [r.run_dir for r in runs],
      "seeds": [list(r.seeds) for r in runs],
      "method": runs[0].method,
  }
  for key, first in per_run[0].items():
    if key == "all_learned":
      flags = [m[key] for m in per_run]
      out[key] = None if None in flags else all(flags)
    elif isinstance(first, dict):
      tasks = list(dict.fromkeys(t for m in per_run for t in m[key]))
      out[key] = {t: stats([m[key].get(t) for m in per_run]) for t in tasks}
    else:
      out[key] = stats([m[key] for m in per_run])
  return out
