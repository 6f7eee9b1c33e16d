"""The report's PNG plots (matplotlib figures drawn on the Agg canvas, no pyplot state).

Each function draws what it is given and writes one PNG; the caller decides whether the runs
have the data (report.md says why a plot is absent).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from epi_jax.eval.mask_drift import refresh_flip_rates
from epi_jax.report.nll_study import QUANTITIES
from epi_jax.report.runs import FinishedRun

DPI = 100


def _save(fig: Figure, path: str) -> str:
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=DPI, bbox_inches="tight")
  return path


def _wrap(text: str, width: int = 50) -> str:
  return textwrap.fill(text, width)


def _grid(n: int, *, width: float, height: float) -> tuple[Figure, list]:
  cols = min(3, n)
  rows = math.ceil(n / cols)
  fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax in axes[n:]:
    ax.set_visible(False)
  return fig, list(axes[:n])


def stage_ends(run: FinishedRun) -> list[int]:
  """Steps at which the stages ended (metrics.jsonl ``eval`` records)."""
  return [r["step"] for r in run.kind("eval")]


def group_names(run: FinishedRun) -> list[str]:
  """The normalization groups of the mask statistics, named when the run's flip_rate
  analysis recorded them, else numbered."""
  per_group = (run.summary.get("analyses", {}).get("flip_rate") or {}).get("per_group")
  count = len(run.summary["mask_history"][0]["protected"])
  return (
      list(per_group)
      if per_group and len(per_group) == count
      else [f"group {i}" for i in range(count)]
  )


def flip_rate_rows(run: FinishedRun) -> tuple[list[int], list[list[float]]]:
  """(refresh steps, per-group flip rates) of every refresh after the first: the run's
  ``flip_rate`` records, else computed from the mask history's counts."""
  records = run.kind("flip_rate")
  if records:
    return [r["step"] for r in records], [r["rate"] for r in records]
  history = run.summary["mask_history"][1:]
  return [r["step"] for r in history], [refresh_flip_rates(r) for r in history]


def accuracy_matrix(run: FinishedRun, title: str, path: str) -> str:
  """Heatmap of the accuracy matrix: rows after each stage, columns tasks, values in cells."""
  rows = run.summary["accuracy_matrix"]
  tasks = list(rows[0]["accuracy"])
  values = np.array(
      [[np.nan if r["accuracy"][t] is None else r["accuracy"][t] for t in tasks] for r in rows],
      dtype=float,
  )
  fig = Figure(figsize=(1.3 * len(tasks) + 3, 0.5 * len(rows) + 1.8), layout="constrained")
  ax = fig.subplots()
  top = max(1.0, float(np.nanmax(values))) if np.isfinite(values).any() else 1.0
  image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=top, aspect="auto")
  fig.colorbar(image, ax=ax, fraction=0.04)
  for (i, j), v in np.ndenumerate(values):
    ax.text(
        j,
        i,
        "n/a" if np.isnan(v) else f"{v:.3f}",
        ha="center",
        va="center",
        color="black" if v > 0.6 * top else "white",
        fontsize=9,
    )
  ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
  ax.set_yticks(
      range(len(rows)), [f"{r['after_stage']}: {', '.join(r['trained'])}"[:40] for r in rows]
  )
  ax.set_xlabel("task")
  ax.set_ylabel("after stage (trained)")
  ax.set_title(_wrap(title, 80), fontsize=10)
  return _save(fig, path)


def loss_curves(groups: Mapping[str, Sequence[FinishedRun]], path: str) -> str:
  """Training loss per group (a line per seed), dotted lines where stages end."""
  fig, axes = _grid(len(groups), width=5.0, height=3.4)
  for ax, (label, runs) in zip(axes, groups.items()):
    for run in runs:
      train = run.kind("train")
      ax.plot(
          [r["step"] for r in train],
          [r["loss"] for r in train],
          label=f"seed {run.seeds[0]}/{run.seeds[1]}",
      )
    for step in stage_ends(runs[0])[:-1]:
      ax.axvline(step, color="grey", linestyle=":", linewidth=1)
    ax.set_title(_wrap(label), fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
  return _save(fig, path)


def mask_overlap(runs: Sequence[tuple[str, FinishedRun]], path: str) -> str:
  """Jaccard overlap of each refresh's mask with the first mask, over training."""
  fig = Figure(figsize=(7, 4), layout="constrained")
  ax = fig.subplots()
  for label, run in runs:
    history = run.summary["mask_history"]
    ax.plot(
        [r["step"] for r in history],
        [r["overlap_first"] for r in history],
        marker=".",
        label=_wrap(f"{label} (seed {run.seeds[0]}/{run.seeds[1]})"),
    )
  ax.set_ylim(0, 1.05)
  ax.set_xlabel("step")
  ax.set_ylabel("Jaccard overlap with the first mask")
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  return _save(fig, path)


def flip_rate_heatmap(run: FinishedRun, title: str, path: str) -> str:
  """Per layer group and refresh: the fraction of the group's mask union that flipped."""
  steps, rates = flip_rate_rows(run)
  names = group_names(run)
  fig = Figure(
      figsize=(min(14, 4.5 + 0.4 * len(steps)), 1 + 0.35 * len(names)), layout="constrained"
  )
  ax = fig.subplots()
  image = ax.imshow(
      np.array(rates, dtype=float).T,
      cmap="magma",
      vmin=0.0,
      vmax=1.0,
      aspect="auto",
      interpolation="nearest",
  )
  fig.colorbar(image, ax=ax, fraction=0.04, label="flip rate")
  ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 12)).astype(int))
  ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
  ax.set_yticks(range(len(names)), names)
  ax.set_xlabel("refresh at step")
  ax.set_title(_wrap(title, 80), fontsize=10)
  return _save(fig, path)


def protected_share(run: FinishedRun, title: str, path: str) -> str:
  """Share of the protected entries held by each layer group at each refresh (stacked)."""
  history = run.summary["mask_history"]
  counts = np.array([r["protected"] for r in history], dtype=float)
  totals = counts.sum(axis=1, keepdims=True)
  share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
  fig = Figure(figsize=(7, 4), layout="constrained")
  ax = fig.subplots()
  ax.stackplot([r["step"] for r in history], share.T, labels=group_names(run), step="post")
  ax.set_ylim(0, 1)
  ax.set_xlabel("refresh at step")
  ax.set_ylabel("share of the protected entries")
  ax.set_title(_wrap(title, 80), fontsize=10)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  return _save(fig, path)


def method_bars(aggregates: Mapping[str, Mapping], path: str) -> str:
  """Mean final accuracy and Avg. Norm. Score per group, error bars = std over seeds."""
  labels = [_wrap(label, 40) for label in aggregates]
  lines = max(label.count("\n") + 1 for label in labels)
  fig = Figure(figsize=(11, 1.2 + (0.15 * lines + 0.25) * len(labels)), layout="constrained")
  axes = fig.subplots(1, 2, sharey=True)
  for ax, key, name in (
      (axes[0], "mean_final_accuracy", "mean final accuracy"),
      (axes[1], "avg_norm_score", "Avg. Norm. Score (0-10)"),
  ):
    means = [a[key]["mean"] for a in aggregates.values()]
    stds = [a[key]["std"] for a in aggregates.values()]
    ax.barh(
        range(len(labels)),
        [np.nan if m is None else m for m in means],
        xerr=[0.0 if s is None else s for s in stds],
        capsize=4,
        color=[f"C{i % 10}" for i in range(len(labels))],
    )
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel(name)
    ax.set_title(f"{name}, mean ± std over seeds", fontsize=10)
  axes[0].invert_yaxis()  # the first group on top (the axes share y)
  return _save(fig, path)


def nll_over_stages(
    bands: Mapping[str, Mapping[str, Sequence[tuple[float, ...]]]],
    stage_names: Sequence[str],
    path: str,
) -> str:
  """One panel per task: each group's held-out NLL before training and after each stage, the
  band its confidence interval (``nll_study.nll_bands``)."""
  tasks = list(dict.fromkeys(t for by_task in bands.values() for t in by_task))
  fig, axes = _grid(len(tasks), width=4.6, height=3.4)
  for ax, task in zip(axes, tasks):
    for i, (label, by_task) in enumerate(bands.items()):
      if task not in by_task:
        continue
      x, mean, low, high = np.array(by_task[task]).T
      ax.plot(x, mean, marker="o", color=f"C{i % 10}", label=_wrap(label, 30))
      ax.fill_between(x, low, high, color=f"C{i % 10}", alpha=0.2)
    ax.set_xticks(range(len(stage_names) + 1), ["before"] + [f"after\n{s}" for s in stage_names])
    ax.set_title(task, fontsize=10)
    ax.set_ylabel("NLL (nats/token)")
  axes[0].legend(fontsize=7)
  return _save(fig, path)


def paired_differences(rows: Sequence[Mapping], path: str) -> str:
  """Each paired difference (``nll_study.paired_rows``) as its mean and interval beside 0."""
  quantities = list(dict.fromkeys(r["quantity"] for r in rows))
  fig, axes = _grid(len(quantities), width=5.0, height=0.6 + 0.45 * len(rows))
  for ax, quantity in zip(axes, quantities):
    mine = [r for r in rows if r["quantity"] == quantity]
    y = np.arange(len(mine))
    means = np.array([r["mean"] for r in mine])
    spans = np.array([[r["mean"] - r["low"], r["high"] - r["mean"]] for r in mine]).T
    ax.errorbar(means, y, xerr=spans, fmt="o", capsize=4)
    ax.axvline(0.0, color="grey", linewidth=1)
    ax.set_yticks(y, [_wrap(f"{r['reference']} − {r['other']}", 30) for r in mine], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(_wrap(QUANTITIES[quantity][0], 40), fontsize=10)
    ax.set_xlabel(f"difference, {int(mine[0]['confidence'] * 100)}% interval")
  return _save(fig, path)
