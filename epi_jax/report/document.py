"""report.md (tables, plot links, number sources), report.json and the plots of a set of runs."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence

from epi_jax.extras import require
from epi_jax.report import nll_study
from epi_jax.report.runs import LEARNED, FinishedRun, aggregate, group_runs, load_run, run_metrics

SCALARS = (  # (run_metrics key, column title, decimals)
    ("mean_final_accuracy", "mean final accuracy", 4),
    ("avg_norm_score", "Avg. Norm. Score", 3),
    ("acc", "ACC", 4),
    ("bwt", "BWT", 4),
    ("forgetting_ratio_mean", "mean FR %", 2),
    ("base_forgetting_ratio_mean", "base-skill FR %", 2),
    ("protected_fraction", "protected fraction", 4),
    ("wall_time_s", "wall time s", 1),
)
TASK_DECIMALS = 4

SOURCES = f"""\
- final accuracy of a task: summary.json `final_accuracy` (the task's headline metric after
  the last stage).
- mean final accuracy: the mean over tasks of summary.json `final_accuracy`.
- Avg. Norm. Score: summary.json `avg_norm_score.avg_norm_score` (0-10).
- ACC, BWT: summary.json `analyses.continual.acc` / `.bwt` (n/a: the run's `eval.analyses`
  has no `continual`).
- mean FR %: the mean of summary.json `forgetting_ratio` over the tasks trained before the
  last stage, null entries left out (= `analyses.continual.forgetting_ratio_mean`).
- base-skill FR %: summary.json `analyses.continual.probes.forgetting_ratio_mean`: Eq. 14 for
  each probe task (`eval.probe_tasks`, trained by no stage) from its score before training to
  its score after the last stage, averaged (n/a: no probe tasks).
- learned: summary.json `accuracy_matrix[k].accuracy[task]` for the first stage k whose
  `trained` lists the task; "every task ≥ {LEARNED}" says whether all of them reach {LEARNED}.
- protected fraction: summary.json `protected_fraction` (static and epi only).
- wall time s: summary.json `wall_time_s` (all sessions of the run).
- mean ± std: over the runs of a group (sample std, ddof=1; 0 with one run); (n=k) when only
  k of the group's runs have the number.
- accuracy matrices: summary.json `accuracy_matrix`.
- loss curves: metrics.jsonl `train` records (`step`, `loss`); stage ends: the `step` of the
  `eval` records.
- mask overlap: summary.json `mask_history[].overlap_first` (Jaccard overlap with the first
  non-empty mask, `epi_jax.mask_stats`) at each refresh `step`.
- flip rate: metrics.jsonl `flip_rate` records (`rate` per layer group); without them the
  same formula (`epi_jax.eval.mask_drift.refresh_flip_rates`) on summary.json
  `mask_history[]` `locked`/`freed`/`protected`. Group names: summary.json
  `analyses.flip_rate.per_group` when recorded, else numbers in the order of the counts.
- protected share: summary.json `mask_history[].protected` of each group over their sum (the
  records hold no group sizes, so this is the share of the protected set, not the fraction
  of each group).
"""


def _number(value: float | None, decimals: int) -> str:
  return "n/a" if value is None else f"{value:.{decimals}f}"


def _stat(stat: Mapping, decimals: int, runs: int) -> str:
  if stat["mean"] is None:
    return "n/a"
  text = f"{stat['mean']:.{decimals}f} ± {stat['std']:.{decimals}f}"
  return text if stat["n"] == runs else f"{text} (n={stat['n']})"


def _flag(value: bool | None) -> str:
  return "n/a" if value is None else ("yes" if value else "no")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  def line(cells):
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

  return "\n".join([line(header), line(["---"] * len(header))] + [line(r) for r in rows])


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60]


def _tasks(metrics: Sequence[Mapping], key: str) -> list[str]:
  return list(dict.fromkeys(t for m in metrics for t in m[key]))


def _tables(
    groups: Mapping[str, Sequence[FinishedRun]],
    aggregates: Mapping[str, dict],
    per_run: Mapping[str, dict],
) -> list[str]:
  """The markdown sections with the group and per-run tables."""
  tasks = _tasks(list(per_run.values()), "final_accuracy")
  learned_tasks = _tasks(list(per_run.values()), "learned")

  def task_cells(agg, key, names):
    return [_stat(agg[key][t], TASK_DECIMALS, agg["n"]) if t in agg[key] else "n/a" for t in names]

  def run_cells(m, key, names):
    return [_number(m[key].get(t), TASK_DECIMALS) for t in names]

  group_rows = [
      [label, a["method"], a["n"]]
      + [_stat(a[key], d, a["n"]) for key, _, d in SCALARS]
      + [_flag(a["all_learned"])]
      for label, a in aggregates.items()
  ]
  run_rows = [[r.run_dir, label, *r.seeds] for label, members in groups.items() for r in members]
  return [
      "## Groups",
      "",
      _table(
          ["group", "method", "runs"]
          + [title for _, title, _ in SCALARS]
          + [f"every task ≥ {LEARNED} (all runs)"],
          group_rows,
      ),
      "",
      "## Final accuracy per task (mean ± std)",
      "",
      _table(
          ["group"] + tasks,
          [[label] + task_cells(a, "final_accuracy", tasks) for label, a in aggregates.items()],
      ),
      "",
      "## Learned: score right after each task's own stage (mean ± std)",
      "",
      f"Forgetting is only meaningful for a task that was learned; a task counts as learned "
      f"when this score is ≥ {LEARNED}.",
      "",
      _table(
          ["group"] + learned_tasks + [f"every task ≥ {LEARNED} (all runs)"],
          [
              [label] + task_cells(a, "learned", learned_tasks) + [_flag(a["all_learned"])]
              for label, a in aggregates.items()
          ],
      ),
      "",
      "## Runs",
      "",
      _table(
          ["run", "group", "data.seed", "train.seed"] + tasks + [title for _, title, _ in SCALARS],
          [
              row
              + run_cells(per_run[row[0]], "final_accuracy", tasks)
              + [_number(per_run[row[0]][key], d) for key, _, d in SCALARS]
              for row in run_rows
          ],
      ),
      "",
      "## Learned per run",
      "",
      _table(
          ["run", "group"] + learned_tasks + [f"every task ≥ {LEARNED}"],
          [
              row[:2]
              + run_cells(per_run[row[0]], "learned", learned_tasks)
              + [_flag(per_run[row[0]]["all_learned"])]
              for row in run_rows
          ],
      ),
      "",
  ]


def _nll_matrix(bands: Mapping[str, Mapping], stage_names: Sequence[str]) -> list[str]:
  """The "Held-out NLL over the stages" section: each group's bands as a table."""
  rows = []
  for label, by_task in bands.items():
    for task, points in by_task.items():
      cells = {round(p[0], 6): f"{p[1]:.3f} [{p[2]:.3f}, {p[3]:.3f}]" for p in points}
      rows.append([label, task] + [cells.get(float(x), "") for x in range(len(stage_names) + 1)])
  return [
      "## Held-out NLL over the stages",
      "",
      f"Each task's held-out response NLL (nats per token, mean over its examples), before "
      f"training and after each stage, mean over seeds [{int(nll_study.CONFIDENCE * 100)}% "
      "hierarchical bootstrap interval: seeds, then examples within each].",
      "",
      _table(["group", "task", "before"] + [f"after {s}" for s in stage_names], rows),
      "",
  ]


def _nll_changes(with_nll: Mapping[str, Sequence[FinishedRun]]) -> list[str]:
  """The section of each group's per-task forgetting and probe change with intervals."""
  changes = [
      [label, nll_study.QUANTITIES[q][0], task, f"{m:+.4f}", f"[{lo:+.4f}, {hi:+.4f}]"]
      for label, members in with_nll.items()
      for q in ("forgetting", "probe")
      for task, (m, lo, hi) in nll_study.task_intervals(members, q).items()
  ]
  if not changes:
    return []
  return [
      "## Held-out NLL forgetting and general-ability change per group",
      "",
      "Per task: the rise of its NLL from the end of its own stage to the end of the stream "
      "(stream forgetting), or from before training to the end (a probe task), mean over "
      f"seeds and examples with its {int(nll_study.CONFIDENCE * 100)}% hierarchical "
      "bootstrap interval; an interval above 0 is a measurable rise.",
      "",
      _table(["group", "quantity", "task", "mean", "interval"], changes),
      "",
  ]


def _nll_paired(rows: Sequence[Mapping], reference: str) -> list[str]:
  """The section of the paired differences of ``reference`` against the other groups."""
  if not rows:
    return []
  return [
      "## Paired differences of held-out NLL",
      "",
      f"{reference} − other on the same seeds and examples: mean and "
      f"{int(nll_study.CONFIDENCE * 100)}% interval; the verdict comes from the interval "
      "alone (`epi_jax.eval.paired`).",
      "",
      _table(
          [
              "comparison",
              "quantity",
              "tasks",
              "mean",
              "interval",
              "seeds",
              "examples/seed",
              "reading",
          ],
          [
              [
                  f"{r['reference']} − {r['other']}",
                  nll_study.QUANTITIES[r["quantity"]][0],
                  ", ".join(r["tasks"]),
                  f"{r['mean']:+.4f}",
                  f"[{r['low']:+.4f}, {r['high']:+.4f}]",
                  r["seeds"],
                  r["examples"],
                  nll_study.reading(r),
              ]
              for r in rows
          ],
      ),
      "",
  ]


def _nll_section(
    groups: Mapping[str, Sequence[FinishedRun]], reference: str | None, plot_dir: str
) -> tuple[list[str], list[dict]]:
  """The held-out NLL study (runs with ``heldout_nll.json``): each group's NLL matrix and
  changes, the paired differences of ``reference`` against every other group, their plots."""
  from epi_jax.report import plots

  with_nll = {
      label: [r for r in members if nll_study.read_heldout(r) is not None]
      for label, members in groups.items()
  }
  with_nll = {label: members for label, members in with_nll.items() if members}
  if not with_nll:
    return [], []
  if reference not in with_nll:
    epi = [label for label, members in with_nll.items() if members[0].method == "epi"]
    reference = (epi or list(with_nll))[0]
  rows = nll_study.paired_rows(with_nll, reference)
  longest = max(
      (nll_study.read_heldout(m[0]) for m in with_nll.values()), key=lambda s: len(s.stages)
  )
  names = ["+".join(s) for s in longest.stages]
  bands = {label: nll_study.nll_bands(members, len(names)) for label, members in with_nll.items()}
  lines = _nll_matrix(bands, names) + _nll_changes(with_nll) + _nll_paired(rows, reference)
  link = os.path.basename(plot_dir)
  path = plots.nll_over_stages(bands, names, os.path.join(plot_dir, "nll_over_stages.png"))
  lines += [f"![held-out NLL over the stages]({link}/{os.path.basename(path)})", ""]
  if rows:
    path = plots.paired_differences(rows, os.path.join(plot_dir, "paired_differences.png"))
    lines += [f"![paired differences]({link}/{os.path.basename(path)})", ""]
  return lines, rows


def require_plotting() -> None:
  """Refuses (``epi_jax.extras.MissingExtra``) where matplotlib, which draws the plots, is
  absent: a caller with hours of runs ahead checks before them."""
  require("matplotlib", "report", "drawing the report's plots")


def _image(plot_dir: str, title: str, path: str) -> str:
  return f"![{title}]({os.path.basename(plot_dir)}/{os.path.basename(path)})"


def _plots(
    groups: Mapping[str, Sequence[FinishedRun]], aggregates: Mapping[str, dict], plot_dir: str
) -> list[str]:
  """Draws every plot the runs have data for; the markdown that shows them or says why not."""
  from epi_jax.report import plots  # matplotlib: checked by write_report

  runs = [(label, r) for label, members in groups.items() for r in members]

  def image(title: str, path: str) -> str:
    return _image(plot_dir, title, path)

  out = [
      "## Plots",
      "",
      "### Method comparison",
      "",
      image(
          "method comparison", plots.method_bars(aggregates, os.path.join(plot_dir, "methods.png"))
      ),
      "",
  ]
  with_loss = {
      label: members for label, members in groups.items() if all(m.kind("train") for m in members)
  }
  out += ["### Loss curves", ""]
  if with_loss:
    out += [
        image("loss curves", plots.loss_curves(with_loss, os.path.join(plot_dir, "loss.png"))),
        "",
    ]
  missing = [label for label in groups if label not in with_loss]
  if missing:
    out += [
        f"Absent for {', '.join(missing)}: a run of the group has no `train` records in "
        "metrics.jsonl.",
        "",
    ]
  masked = [(label, r) for label, r in runs if r.summary["mask_history"]]
  out += ["### Mask overlap with the first mask", ""]
  out += (
      [
          image(
              "mask overlap", plots.mask_overlap(masked, os.path.join(plot_dir, "mask_overlap.png"))
          ),
          "",
      ]
      if masked
      else [
          "Absent: no run refreshed a mask (summary.json `mask_history` is empty in every run; "
          "only epi refreshes its mask, static keeps one fixed mask).",
          "",
      ]
  )
  return out + _run_plots(groups, plot_dir)


def _run_plots(groups: Mapping[str, Sequence[FinishedRun]], plot_dir: str) -> list[str]:
  """The per-run plots (accuracy matrices, flip rates, protected shares) as markdown."""
  from epi_jax.report import plots  # matplotlib: checked by write_report

  runs = [(label, r) for label, members in groups.items() for r in members]
  names = {
      r.run_dir: f"{i:02d}_{_slug(label)}_s{r.seeds[0]}-{r.seeds[1]}"
      for i, (label, r) in enumerate(runs)
  }

  def per_run(
      kind: str, title: str, has: Callable[[FinishedRun], bool], draw, why: str
  ) -> list[str]:
    lines, without = [], []
    for label, r in runs:
      if not has(r):
        without.append(r.run_dir)
        continue
      caption = f"{label}, seed {r.seeds[0]}/{r.seeds[1]}"
      lines += [
          f"{caption} (`{r.run_dir}`):",
          "",
          _image(
              plot_dir,
              f"{title}: {caption}",
              draw(r, caption, os.path.join(plot_dir, f"{kind}_{names[r.run_dir]}.png")),
          ),
          "",
      ]
    if without:
      lines += [f"Absent for {', '.join(f'`{d}`' for d in without)}: {why}", ""]
    return [f"### {title}", ""] + lines

  out = []
  out += per_run("accuracy", "Accuracy matrices", lambda r: True, plots.accuracy_matrix, "")
  out += per_run(
      "flip_rate",
      "Flip rate per layer group and refresh",
      lambda r: bool(r.summary["mask_history"][1:]),
      plots.flip_rate_heatmap,
      "fewer than two mask refreshes (a flip rate compares a refresh with the one "
      "before it; only epi refreshes).",
  )
  out += per_run(
      "protected",
      "Protected entries per layer group",
      lambda r: any(sum(h["protected"]) for h in r.summary["mask_history"]),
      plots.protected_share,
      "no refresh with protected entries in summary.json `mask_history` (only epi "
      "records per-group counts).",
  )
  return out


def write_report(
    run_dirs: Sequence[str],
    out_dir: str,
    *,
    labels: Mapping[str, str] | None = None,
    title: str = "EPI runs",
    extra_markdown: str = "",
    reference: str | None = None,
) -> str:
  """Writes ``out_dir/report.md``, ``out_dir/report.json`` and ``out_dir/plots/*.png`` (the PNGs
  of an earlier report there are removed first).

  Args:
    run_dirs: finished run directories (each with config.yaml, summary.json, metrics.jsonl).
    out_dir: where the report goes (created).
    labels: optional run_dir -> group label (see ``group_runs``).
    title: the report's heading.
    extra_markdown: appended to report.md as it is.
    reference: the group the held-out NLL study compares every other group with (runs with
      the ``nll`` analysis); None: the first epi group, else the first group.

  Returns:
    The path of report.md.
  """
  if not run_dirs:
    raise ValueError("write_report: no run directories")
  require_plotting()
  runs = [load_run(d) for d in run_dirs]
  groups = group_runs(runs, labels)
  aggregates = {label: aggregate(members) for label, members in groups.items()}
  per_run = {r.run_dir: run_metrics(r) for members in groups.values() for r in members}
  plot_dir = os.path.join(out_dir, "plots")
  os.makedirs(plot_dir, exist_ok=True)
  for name in os.listdir(plot_dir):  # an earlier report's plots would sit beside these
    if name.endswith(".png"):
      os.remove(os.path.join(plot_dir, name))
  lines = [
      f"# {title}",
      "",
      f"{len(runs)} runs in {len(groups)} groups: runs whose configs differ only in "
      "`data.seed` and `train.seed` form one group; mean ± std over a group's runs.",
      "",
  ]
  lines += _tables(groups, aggregates, per_run)
  lines += _plots(groups, aggregates, plot_dir)
  nll_lines, paired = _nll_section(groups, reference, plot_dir)
  lines += nll_lines
  lines += ["## Sources of the numbers", "", SOURCES]
  if extra_markdown:
    lines += [extra_markdown]
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines).rstrip("\n") + "\n")
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump({"groups": aggregates, "runs": per_run, "nll_paired": paired}, f, indent=1)
  return path
