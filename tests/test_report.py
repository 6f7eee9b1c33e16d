"""The report of finished runs: its tables equal the summaries, its plots are real images."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from PIL import Image

from epi_jax.report import RunError, aggregate, group_runs, load_run, write_report
from epi_jax.report.cli import main
from epi_jax.report.plots import flip_rate_rows
from epi_jax.train.config import (
    CheckpointSection,
    Config,
    DataSection,
    EvalSection,
    LogSection,
    MethodSection,
    ModelSection,
    OptimSection,
    TrainSection,
)
from epi_jax.train.loop import train

METHODS = ("epi", "multistage")
SEEDS = (0, 1)


def _config(method: str, seed: int) -> Config:
  return Config(
      model=ModelSection(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2),
      data=DataSection(
          tasks=["logic_choice", "rewrite"], n_train=16, n_eval=2, seq_len=112, seed=seed
      ),
      method=MethodSection(type=method, p=0.05, interval=1),
      optim=OptimSection(lr=3e-3, batch_size=4),
      train=TrainSection(steps_per_stage=3, seed=seed),
      checkpoint=CheckpointSection(every=0),
      eval=EvalSection(max_new_tokens=2, batch_size=2, analyses=["continual", "flip_rate", "nll"]),
      log=LogSection(every=1, progress=False, tensorboard=False),
  )


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
  """2 methods x 2 seeds of tiny two-stage runs, in the order method-major."""
  root = tmp_path_factory.mktemp("runs")
  # The second seed of a method compiles the programs of the first: a compilation cache
  # for these runs halves their time.
  options = {
      "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
      "jax_persistent_cache_min_compile_time_secs": 0.0,
  }
  before = {name: getattr(jax.config, name) for name in options}
  for name, value in options.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  dirs = []
  try:
    for method in METHODS:
      for seed in SEEDS:
        run_dir = str(root / f"{method}_{seed}")
        train(_config(method, seed), run_dir=run_dir)
        dirs.append(run_dir)
  finally:
    for name, value in before.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()
  return dirs


@pytest.fixture(scope="module")
def summaries(run_dirs):
  out = {}
  for d in run_dirs:
    with open(os.path.join(d, "summary.json")) as f:
      out[d] = json.load(f)
  return out


@pytest.fixture(scope="module")
def cli_report(run_dirs, tmp_path_factory):
  """The report written by ``python -m epi_jax.report``: (report.md path, its text)."""
  out = tmp_path_factory.mktemp("report")
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "epi_jax.report",
          *run_dirs,
          "--out",
          str(out),
          "--title",
          "Tiny runs",
      ],
      capture_output=True,
      text=True,
      check=True,
  )
  path = result.stdout.strip().splitlines()[-1]
  assert path == str(out / "report.md")
  with open(path) as f:
    return path, f.read()


def _tables(markdown: str) -> dict[str, list[dict[str, str]]]:
  """Section heading -> rows (column title -> cell) of the table under it."""
  tables, heading, lines = {}, None, markdown.splitlines()
  for i, line in enumerate(lines):
    if line.startswith("## "):
      heading = line[3:]
    elif line.startswith("| ") and lines[i - 1].strip() == "" and heading:
      header = [c.strip() for c in line.strip("|").split(" | ")]
      rows = []
      for row in lines[i + 2 :]:
        if not row.startswith("|"):
          break
        rows.append(dict(zip(header, (c.strip() for c in row.strip("|").split(" | ")))))
      tables[heading] = rows
  return tables


def _assert_number(cell: str, value) -> None:
  """``cell`` shows ``value`` to its printed decimals (n/a for None)."""
  if value is None:
    assert cell == "n/a"
    return
  decimals = len(cell.split(".")[1]) if "." in cell else 0
  assert abs(float(cell) - value) <= 0.5 * 10.0**-decimals + 1e-12, (cell, value)


def _assert_stat(cell: str, values) -> None:
  """``cell`` is "mean ± std" of ``values`` (numpy mean, std with ddof=1), "(n=k)" if some are
  missing."""
  present = [v for v in values if v is not None]
  if not present:
    assert cell == "n/a"
    return
  match = re.fullmatch(r"(\S+) ± (\S+)(?: \(n=(\d+)\))?", cell)
  assert match, cell
  _assert_number(match[1], float(np.mean(present)))
  _assert_number(match[2], float(np.std(present, ddof=1)) if len(present) > 1 else 0.0)
  assert int(match[3] or len(values)) == len(present)


def _learned(summary: dict) -> dict:
  """The accuracy of each task right after the stage that trained it."""
  return {
      task: summary["accuracy_matrix"][k]["accuracy"][task]
      for k, stage in enumerate(summary["stages"])
      for task in stage
  }


def _numbers(summary: dict) -> dict:
  """The report's scalar columns, read straight from summary.json."""
  last = summary["stages"][-1]
  fr = [v for t, v in summary["forgetting_ratio"].items() if t not in last and v is not None]
  continual = summary["analyses"]["continual"]
  assert (np.mean(fr) if fr else None) == pytest.approx(continual["forgetting_ratio_mean"])
  return {
      "mean final accuracy": float(np.mean(list(summary["final_accuracy"].values()))),
      "Avg. Norm. Score": summary["avg_norm_score"]["avg_norm_score"],
      "ACC": continual["acc"],
      "BWT": continual["bwt"],
      "mean FR %": float(np.mean(fr)) if fr else None,
      "base-skill FR %": (continual.get("probes") or {}).get("forgetting_ratio_mean"),
      "protected fraction": summary.get("protected_fraction"),
      "wall time s": summary["wall_time_s"],
  }


def test_group_runs_puts_the_seeds_of_a_method_together(run_dirs):
  runs = [load_run(d) for d in run_dirs]
  groups = group_runs(runs)
  assert list(groups) == list(METHODS)
  for method, members in groups.items():
    assert [r.method for r in members] == [method] * len(SEEDS)
    assert [r.seeds for r in members] == [(s, s) for s in SEEDS]
  labelled = group_runs(runs, {run_dirs[0]: "EPI p=5%", run_dirs[1]: "EPI p=5%"})
  assert list(labelled) == ["EPI p=5%", "multistage"]
  split = group_runs(runs, {run_dirs[0]: "a", run_dirs[1]: "b"})  # one config, two labels
  assert {label: len(members) for label, members in split.items()} == {
      "a": 1,
      "b": 1,
      "multistage": 2,
  }
  with pytest.raises(ValueError, match="names runs of different configs"):
    group_runs(runs, {run_dirs[0]: "same", run_dirs[2]: "same"})


def test_aggregate_is_numpy_mean_and_sample_std_of_the_summaries(run_dirs, summaries):
  runs = [load_run(d) for d in run_dirs]
  for method, members in group_runs(runs).items():
    agg = aggregate(members)
    ours = [summaries[r.run_dir] for r in members]
    assert agg["n"] == len(SEEDS) and agg["method"] == method
    for task in ours[0]["final_accuracy"]:
      values = [s["final_accuracy"][task] for s in ours]
      assert agg["final_accuracy"][task]["mean"] == pytest.approx(np.mean(values), abs=1e-15)
      assert agg["final_accuracy"][task]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-15)
      learned = [_learned(s)[task] for s in ours]
      assert agg["learned"][task]["values"] == learned
    walls = [s["wall_time_s"] for s in ours]
    assert agg["wall_time_s"]["mean"] == pytest.approx(np.mean(walls))
    assert agg["wall_time_s"]["std"] == pytest.approx(np.std(walls, ddof=1))
  single = aggregate(runs[:1])
  assert single["wall_time_s"]["std"] == 0.0 and single["n"] == 1


def test_report_tables_equal_the_summaries(run_dirs, summaries, cli_report):
  _, markdown = cli_report
  assert markdown.startswith("# Tiny runs\n")
  tables = _tables(markdown)
  runs = {row["run"]: row for row in tables["Runs"]}
  assert sorted(runs) == sorted(run_dirs)
  learned_rows = {row["run"]: row for row in tables["Learned per run"]}
  for run_dir, summary in summaries.items():
    row = runs[run_dir]
    assert row["group"] == summary["method"]
    assert (int(row["data.seed"]), int(row["train.seed"])) == (int(run_dir[-1]), int(run_dir[-1]))
    for task, value in summary["final_accuracy"].items():
      _assert_number(row[task], value)
    for column, value in _numbers(summary).items():
      _assert_number(row[column], value)
    learned = _learned(summary)
    for task, value in learned.items():
      _assert_number(learned_rows[run_dir][task], value)
    assert learned_rows[run_dir]["every task ≥ 0.5"] == (
        "yes" if all(v >= 0.5 for v in learned.values()) else "no"
    )

  groups = {row["group"]: row for row in tables["Groups"]}
  finals = {row["group"]: row for row in tables["Final accuracy per task (mean ± std)"]}
  learned_groups = {
      row["group"]: row
      for row in tables["Learned: score right after each task's own stage (mean ± std)"]
  }
  assert sorted(groups) == sorted(METHODS)
  for method in METHODS:
    ours = [s for s in summaries.values() if s["method"] == method]
    assert groups[method]["runs"] == str(len(SEEDS))
    for column in _numbers(ours[0]):
      _assert_stat(groups[method][column], [_numbers(s)[column] for s in ours])
    for task in ours[0]["final_accuracy"]:
      _assert_stat(finals[method][task], [s["final_accuracy"][task] for s in ours])
      _assert_stat(learned_groups[method][task], [_learned(s)[task] for s in ours])
    every = all(v >= 0.5 for s in ours for v in _learned(s).values())
    assert learned_groups[method]["every task ≥ 0.5 (all runs)"] == ("yes" if every else "no")


def test_every_plot_is_a_non_empty_image_with_more_than_one_colour(cli_report):
  path, markdown = cli_report
  links = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", markdown)
  kinds = sorted({os.path.basename(link).split("_")[0].removesuffix(".png") for link in links})
  assert kinds == ["accuracy", "flip", "loss", "mask", "methods", "nll", "paired", "protected"]
  assert sum(link.startswith("plots/accuracy_") for link in links) == len(METHODS) * len(SEEDS)
  assert sum(link.startswith("plots/flip_rate_") for link in links) == len(SEEDS)  # epi only
  for link in links:
    file = os.path.join(os.path.dirname(path), link)
    assert os.path.getsize(file) > 0
    with Image.open(file) as image:
      pixels = np.asarray(image.convert("RGB"))
    assert image.width > 100 and image.height > 100, link
    assert (pixels != pixels[0, 0]).any(axis=-1).any(), f"{link} has one colour"
  # The multistage runs have no mask: the report says so instead of drawing nothing.
  assert markdown.count("Absent for") == 2 and "only epi" in markdown


def test_nll_tables_equal_the_per_example_files(run_dirs, cli_report):
  """The NLL matrix cells are means over seeds of each file's per-token NLL, the paired row
  is epi's mean minus multistage's on the same seeds and examples."""
  _, markdown = cli_report
  tables = _tables(markdown)
  per_token = {}
  for d in run_dirs:
    with open(os.path.join(d, "heldout_nll.json")) as f:
      for r in json.load(f)["records"]:
        per_token.setdefault((d, r["point"], r["task"]), []).append(r["nll_sum"] / r["tokens"])
  cells = {(row["group"], row["task"]): row for row in tables["Held-out NLL over the stages"]}
  assert sorted(cells) == sorted((m, t) for m in METHODS for t in ("logic_choice", "rewrite"))
  for (method, task), row in cells.items():
    dirs = [d for d in run_dirs if os.path.basename(d).startswith(method)]
    for column, point in (("before", "before"), ("after rewrite", "after_stage_1")):
      mean = np.mean([per_token[d, point, task] for d in dirs])
      assert row[column].split(" [")[0] == f"{mean:.3f}", (method, task, column)
  rows = {row["quantity"]: row for row in tables["Paired differences of held-out NLL"]}
  assert sorted(rows) == ["final stream NLL (nats/token)", "stream forgetting (nats/token)"]
  final = rows["final stream NLL (nats/token)"]
  assert final["comparison"] == "epi − multistage" and final["seeds"] == str(len(SEEDS))
  diffs = [
      np.mean(
          [
              a - b
              for task in ("logic_choice", "rewrite")
              for a, b in zip(
                  per_token[d, "after_stage_1", task],
                  per_token[d.replace("epi", "multistage"), "after_stage_1", task],
              )
          ]
      )
      for d in run_dirs
      if os.path.basename(d).startswith("epi")
  ]
  assert final["mean"] == f"{np.mean(diffs):+.4f}"


def test_flip_rates_without_records_come_from_the_mask_history(run_dirs):
  run = load_run(run_dirs[0])
  steps, rates = flip_rate_rows(run)
  assert steps == [r["step"] for r in run.summary["mask_history"][1:]] and len(steps) >= 2
  bare = dataclasses.replace(run, records=[r for r in run.records if r["kind"] != "flip_rate"])
  np.testing.assert_allclose(flip_rate_rows(bare)[1], rates, rtol=1e-12)


def test_write_report_appends_extra_markdown_and_uses_the_labels(run_dirs, tmp_path):
  labels = {run_dirs[0]: "EPI", run_dirs[1]: "EPI", run_dirs[3]: "SFT"}
  extra = "## Paper vs ours\n\n| a | b |\n| --- | --- |\n| 1 | 2 |"
  path = write_report(
      [run_dirs[3], run_dirs[1], run_dirs[0]],
      str(tmp_path),
      labels=labels,
      title="T",
      extra_markdown=extra,
  )
  with open(path) as f:
    markdown = f.read()
  assert markdown.rstrip().endswith("| 1 | 2 |")
  assert [row["group"] for row in _tables(markdown)["Groups"]] == ["SFT", "EPI"]
  with open(tmp_path / "report.json") as f:
    saved = json.load(f)
  assert saved["groups"]["EPI"]["run_dirs"] == [run_dirs[1], run_dirs[0]]
  assert saved["groups"]["SFT"]["n"] == 1 and saved["groups"]["SFT"]["wall_time_s"]["std"] == 0


def test_a_second_report_into_the_same_dir_leaves_only_its_own_plots(run_dirs, tmp_path):
  write_report(run_dirs, str(tmp_path))
  first = set(os.listdir(tmp_path / "plots"))
  write_report([run_dirs[0]], str(tmp_path))
  second = set(os.listdir(tmp_path / "plots"))
  with open(tmp_path / "report.md") as f:
    linked = set(re.findall(r"plots/([^)]+\.png)", f.read()))
  assert second < first and second == linked


def test_unfinished_or_broken_runs_are_named(run_dirs, tmp_path, capsys):
  unfinished = tmp_path / "unfinished"
  shutil.copytree(run_dirs[0], unfinished, ignore=shutil.ignore_patterns("checkpoints"))
  os.remove(unfinished / "summary.json")
  with pytest.raises(RunError, match=f"{unfinished}: no summary.json"):
    load_run(str(unfinished))
  assert main([run_dirs[1], str(unfinished), "--out", str(tmp_path / "out")]) == 2
  assert capsys.readouterr().err == (
      f"error: {unfinished}: no summary.json: the run has not finished (or is not a run "
      "directory)\n"
  )

  broken = tmp_path / "broken"
  shutil.copytree(run_dirs[0], broken, ignore=shutil.ignore_patterns("checkpoints"))
  (broken / "summary.json").write_text('{"method": ')
  with pytest.raises(RunError, match=f"{broken / 'summary.json'}: not valid JSON"):
    load_run(str(broken))
  (broken / "summary.json").write_text('{"method": "epi"}')
  with pytest.raises(RunError, match=r"summary.json: missing stages, accuracy_matrix"):
    load_run(str(broken))
  os.remove(broken / "metrics.jsonl")
  with pytest.raises(RunError, match=f"{broken / 'metrics.jsonl'}: missing"):
    load_run(str(broken))


def test_a_key_a_run_predates_reads_as_its_default():
  """Runs saved before a config field existed group with runs that have its default."""
  import dataclasses

  from epi_jax.report.runs import _comparable

  new = dataclasses.asdict(_config("epi", 0))
  old = dataclasses.asdict(_config("epi", 1))
  del old["data"]["skip"]
  assert _comparable(old) == _comparable(new)
  new["data"]["skip"] = 5
  assert _comparable(old) != _comparable(new)
