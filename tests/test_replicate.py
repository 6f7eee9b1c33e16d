"""The replication runner: its grid, the paper's claims, skip / resume, and the report."""

import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import yaml

from epi_jax.replicate import compare, grid, measure, paper, runner
from epi_jax.replicate.cli import main
from epi_jax.errors import InputError
from epi_jax.report import FinishedRun
from epi_jax.train.loading import find_config, load_config, to_dict

TINY = """
model: {preset: tiny, hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 2}
data: {tasks: [logic_choice, rewrite], n_train: 32, n_eval: 4, seq_len: 112}
optim: {lr: 3.0e-3, batch_size: 8}
train: {epochs: 1}
checkpoint: {every: 2, keep: 5}
eval: {max_new_tokens: 4, batch_size: 4}
log: {every: 1, tensorboard: false}
"""


@pytest.mark.parametrize("name", sorted(grid.PRESETS))
def test_every_preset_config_loads(name, capsys):
  """--dry-run checks every run's config (the paper's 8B ones through the memory plan)."""
  preset = grid.PRESETS[name]
  jobs = runner.plan(preset, 1, "/tmp/unused")
  assert len({j.run_dir for j in jobs}) == len(jobs)
  assert runner.dry_run(preset, jobs) == 0, capsys.readouterr().out


def test_each_seed_starts_from_its_own_base_model_named_by_its_config_hash():
  preset = grid.PRESETS["cpu"]
  bases = runner.base_jobs(preset, 2, "/tmp/out")
  assert list(bases) == [0, 1] and bases == runner.base_jobs(preset, 2, "/tmp/out")
  assert len({b.run_dir for b in bases.values()}) == 2
  assert all(os.path.dirname(b.run_dir) == "/tmp/out/base" for b in bases.values())
  for seed, base in bases.items():
    assert base.entry.overrides == ("checkpoint.save_model=true", *grid.CPU_BASE)
    assert base.overrides[-2:] == [f"data.seed={seed}", f"train.seed={seed}"]
  other = dataclasses.replace(preset, base=(*grid.CPU_BASE, "optim.lr=1e-3"))
  assert runner.base_jobs(other, 1, "/tmp/out")[0].run_dir != bases[0].run_dir
  for job in runner.plan(preset, 2, "/tmp/out"):
    assert f"model.checkpoint={bases[job.seed].run_dir}/model" in job.overrides
  assert runner.base_jobs(grid.PRESETS["cpu_scratch"], 2, "/tmp/out") == {}


def test_a_base_without_its_model_folder_is_trained_again(tmp_path):
  """Committed results keep a base's summary.json, not its model: a clone must retrain it."""
  (base,) = runner.base_jobs(grid.PRESETS["cpu"], 1, str(tmp_path)).values()
  os.makedirs(base.run_dir)
  config = to_dict(load_config(find_config(base.config), base.overrides))
  with open(os.path.join(base.run_dir, "config.yaml"), "w") as f:
    yaml.safe_dump(config, f)
  with open(os.path.join(base.run_dir, "summary.json"), "w") as f:
    json.dump({"final_accuracy": {}}, f)
  assert runner.status(base) == "new"
  os.makedirs(os.path.join(base.run_dir, "model"))
  assert runner.status(base) == "done"
  assert not any(
      o.startswith("model.checkpoint=")
      for job in runner.plan(grid.PRESETS["cpu_scratch"], 1, "/tmp/out")
      for o in job.overrides
  )


def test_preset_configs_are_found_from_any_directory(tmp_path, monkeypatch):
  """The presets name configs/...: from a directory without it the package's copy is used (the
  repository's file, not a duplicate), a local file of that name wins, a missing one is an
  InputError naming it."""
  from epi_jax.train.loading import find_config

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  monkeypatch.chdir(tmp_path)
  shipped = find_config("configs/replicate/cpu.yaml")
  assert os.path.isabs(shipped) and shipped.endswith(
      os.path.join("epi_jax", "configs", "replicate", "cpu.yaml")
  )
  assert os.path.samefile(shipped, os.path.join(repo, "configs", "replicate", "cpu.yaml"))
  job = runner.plan(grid.PRESETS["cpu"], 1, str(tmp_path / "out"))[0]
  assert runner.status(job) == "new"
  assert job.command()[job.command().index("--config") + 1] == shipped
  (tmp_path / "configs" / "replicate").mkdir(parents=True)
  (tmp_path / "configs" / "replicate" / "cpu.yaml").write_text(TINY)
  assert find_config("configs/replicate/cpu.yaml") == "configs/replicate/cpu.yaml"
  with pytest.raises(InputError, match="configs/replicate/none.yaml: no such config file"):
    find_config("configs/replicate/none.yaml")


def test_claims_name_runs_of_the_full_grid():
  preset = grid.PRESETS["cpu"]
  names = {e.name for e in grid.entries(preset)}
  claims = paper.claims(preset.h_sweep, preset.interval)
  # Table 9 (the spread over seeds) is reported, not claimed.
  assert {c.table for c in claims} == set(grid.ALL_TABLES) - {"Table 9"}
  for claim in claims:
    for side in (claim.high, claim.low):
      if not isinstance(side, float):
        assert side[0] in names and side[1] in paper.METRICS, claim
  # The paper's own numbers agree with its claims.
  for claim in claims:
    hi, lo = claim.paper
    if hi is not None and lo is not None:
      assert hi > lo, claim


def test_verdict_comes_from_the_paired_interval_over_seeds():
  rng = np.random.default_rng(0)
  low = dict(enumerate(rng.normal(size=5)))
  above = {s: v + 1.0 + 0.1 * rng.random() for s, v in low.items()}
  assert paper.verdict(above, low)[0] == "agrees"
  assert paper.verdict(low, above)[0] == "disagrees"
  v, d = paper.verdict(above, low)
  diffs = [above[s] - low[s] for s in low]
  assert d.mean == pytest.approx(np.mean(diffs)) and d.seeds == 5
  assert d.low >= min(diffs) - 1e-12 and d.high <= max(diffs) + 1e-12
  # Large differences of both signs over seeds: the interval holds 0, whatever the means.
  mixed = {s: v + (3.0 if s % 2 else -2.5) for s, v in low.items()}
  assert paper.verdict(mixed, low)[0] == "cannot tell"
  # Only the seeds both sides measured are paired.
  assert paper.verdict({0: 2.0, 1: 3.0, 7: -9.0}, {0: 1.0, 1: 1.0})[1].seeds == 2
  assert paper.verdict({}, low) == ("not measured", None)
  # One seed has no spread: the direction only, never agreement.
  assert paper.verdict({0: 2.0}, {0: 1.0})[0] == "same direction, 1 seed"
  assert paper.verdict({0: 1.0}, {0: 2.0})[0] == "opposite direction, 1 seed"
  assert paper.verdict({0: 1.0}, {0: 1.0})[0] == "equal, 1 seed"


def test_claim_metrics():
  rng = np.random.default_rng(0)
  fr = rng.uniform(1, 50, size=3)
  summary = {
      "method": "epi",
      "stages": [["a"], ["b"], ["c"]],
      "wall_time_s": 1.0,
      "accuracy_matrix": [
          {"after_stage": k, "trained": [t], "accuracy": {"a": 0.5, "b": 0.5, "c": 0.5}}
          for k, t in enumerate("abc")
      ],
      "final_accuracy": {"a": 0.1, "b": 0.2, "c": 0.96},
      "forgetting_ratio": {"a": fr[0], "b": fr[1], "c": 0.0},
      "avg_norm_score": {"avg_norm_score": 4.2, "normalized": {"a": 1.0, "b": 2.0, "c": 9.6}},
      "mask_overlap_first": {"25%": 0.8, "50%": 0.6, "75%": 0.5, "100%": 0.4},
      "analyses": {
          "gradient_conflict": {"final": {"average": 0.12}},
          "task_overlap": {"final": {"average": 0.3}},
          "flip_rate": {
              "per_group": {
                  "embed/embedding": 0.9,
                  "block/0": 0.1,
                  "block/1": 0.7,
                  "final_norm/scale": 0.5,
              }
          },
          "perturbation": {"early": {"spearman": 0.5}, "late": {"spearman": 0.6}},
      },
  }
  run = FinishedRun(
      "r", {"data": {"tasks": ["a", "b", "c"], "seed": 0}, "train": {"seed": 0}}, summary, []
  )
  m = measure.claim_metrics(run)
  assert m["forgetting"] == pytest.approx(np.mean(fr[:2]))
  assert m["last_task"] == 9.6 and m["tgc"] == 0.12 and m["task_jaccard"] == 0.3
  assert (m["flip_lowest"], m["flip_highest"]) == (0.1, 0.7)
  assert (m["overlap_25"], m["overlap_100"]) == (0.8, 0.4)
  assert m["spearman_middle"] is None and m["spearman_late"] == 0.6


def test_comparison_table_counts_verdicts():
  claims = [
      paper.Claim(
          "Table 4", ("epi", "avg_norm_score"), ("epi_beta0", "avg_norm_score"), (7.98, 7.81)
      )
  ]
  text, counts = compare.comparison(
      claims,
      {
          "epi": {"avg_norm_score": {0: 3.1, 1: 2.9, 2: 3.0}},
          "epi_beta0": {"avg_norm_score": {0: 2.0, 1: 2.1, 2: 1.9}},
      },
  )
  assert counts == {"agrees": 1}
  assert (
      "| epi (Avg. Norm. Score) > epi_beta0 (Avg. Norm. Score) | 7.98 > 7.81 | 3.000 ± 0.100 "
      "| 2.000 ± 0.100 | +1.000 [+0.800, +1.100] | 3 | agrees |" in text
  )
  constant = [paper.Claim("Table 15", ("epi", "spearman_late"), 0.0, (0.69, 0.0))]
  text, counts = compare.comparison(constant, {"epi": {"spearman_late": {0: 0.2, 1: -0.1}}})
  assert counts == {"cannot tell": 1} and "| 2 | cannot tell |" in text


def _summary(run_dir: str) -> dict:
  with open(os.path.join(run_dir, "summary.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_runner_trains_skips_resumes_and_reports(tmp_path, monkeypatch, capsys):
  """Table 4's runs at two seeds; a second call trains nothing; a run interrupted after a
  checkpoint resumes to the same parameters; the report compares with the paper."""
  config = tmp_path / "tiny.yaml"
  config.write_text(TINY)
  tiny = dataclasses.replace(
      grid.PRESETS["cpu"],
      name="tiny",
      configs=((str(config), ("Table 4",)),),
      interval=2,
      h_sweep=(2,),
      p_sweep=(0.01,),
      analyses=(),
      description="tiny",
      run_sets=(),
      base=("method.type=full", "train.steps_per_stage=2", "train.epochs=1"),
  )
  monkeypatch.setitem(grid.PRESETS, "tiny", tiny)
  out = tmp_path / "out"
  assert main(["--preset", "tiny", "--seeds", "2", "--out", str(out), "--jobs", "2"]) == 0
  jobs = runner.plan(tiny, 2, str(out))
  assert {j.entry.name for j in jobs} == {"epi", "epi_beta0", "epi_beta0.9"}
  sha = {j.run_dir: _summary(j.run_dir)["params_sha256"] for j in jobs}
  assert len(set(sha.values())) == len(jobs)  # seeds and settings differ
  bases = runner.base_jobs(tiny, 2, str(out))
  for job in jobs:  # every run starts from its seed's base model, trained once
    base = _summary(bases[job.seed].run_dir)
    assert base["method"] == "full" and base["steps"] == 2
    saved = (pathlib.Path(job.run_dir) / "config.yaml").read_text()
    assert f"checkpoint: {bases[job.seed].run_dir}/model" in saved

  assert main(["--preset", "tiny", "--seeds", "2", "--out", str(out)]) == 0
  assert "6 runs: 6 finished, 0 to resume, 0 to start" in capsys.readouterr().out
  args = ["--preset", "tiny", "--seeds", "2", "--out", str(out), "--runs"]
  assert main([*args, "epi_beta0"]) == 0
  assert "2 runs: 2 finished, 0 to resume, 0 to start" in capsys.readouterr().out
  assert main([*args, "epi,nope"]) == 2
  assert capsys.readouterr().err == "error: --runs: nope not in the tiny grid\n"

  victim = jobs[0]
  os.remove(os.path.join(victim.run_dir, "summary.json"))
  assert runner.status(victim) == "partial"
  assert main(["--preset", "tiny", "--seeds", "2", "--out", str(out)]) == 0
  assert "1 to resume" in capsys.readouterr().out
  assert _summary(victim.run_dir)["params_sha256"] == sha[victim.run_dir]

  report = (out / "report" / "report.md").read_text()
  assert "### Table 4" in report
  counts = json.loads((out / "comparison.json").read_text())
  assert counts["seeds"] == {"epi": 2, "epi_beta0": 2, "epi_beta0.9": 2}
  measured = {k: n for k, n in counts["verdicts"].items() if k != "not measured"}
  assert sum(measured.values()) >= 3  # Table 4's three claims (other tables have no runs here)


def test_docs_block_is_rewritten_from_the_report(tmp_path):
  report = tmp_path / "out" / "report" / "report.md"
  report.parent.mkdir(parents=True)
  report.write_text(
      "# EPI\n\n## Groups\n\n| a |\n| --- |\n| 1 |\n\n## Plots\n\nnot copied\n\n"
      "## Held-out NLL over the stages\n\n![nll](plots/nll_over_stages.png)\n\n"
      "## The paper beside ours\n\n### Table 1\n\n| b |\n"
  )
  docs = tmp_path / "docs" / "replication.md"
  docs.parent.mkdir()
  docs.write_text(
      "intro\n<!-- replicate:smollm2 begin -->\nold numbers\n<!-- replicate:smollm2 end -->\nout\n"
  )
  runner.write_docs(str(report), "smollm2", str(docs))
  text = docs.read_text()
  assert text.startswith("intro\n<!-- replicate:smollm2 begin -->\n### Held-out NLL over")
  assert "old numbers" not in text and "not copied" not in text and text.endswith("end -->\nout\n")
  assert "![nll](../out/report/plots/nll_over_stages.png)" in text
  assert text.index("### Held-out NLL") < text.index("### Groups\n\n| a |")
  assert "### The paper beside ours\n\n#### Table 1\n\n| b |" in text  # nesting kept
  runner.write_docs(str(report), "smollm2", str(docs))  # idempotent
  assert docs.read_text() == text
  with pytest.raises(InputError, match="needs one <!-- replicate:cpu begin --> line"):
    runner.docs_block(str(docs), "cpu")


REPO = os.path.dirname(os.path.dirname(__file__))


@pytest.mark.slow
@pytest.mark.parametrize("preset, seeds, runs", [("smollm2", 3, 18), ("cpu", 5, 120)])
def test_committed_results_rebuild_the_report_and_the_docs(tmp_path, preset, seeds, runs):
  """--report-only on a copy of results/PRESET (what a fresh clone has) writes the report with
  the held-out NLL tables from the committed JSON alone, and rewrites docs/replication.md's
  block of the preset to exactly what is committed."""
  results = os.path.join(REPO, "results", preset)
  if not os.path.isdir(results):
    pytest.skip(f"no committed results/{preset}")
  out = tmp_path / "results" / preset
  # what a clone has: not the checkpoints, logs, models or compilation cache a local grid leaves
  skip = shutil.ignore_patterns(
      "report", "checkpoints", "logs", "jax_cache", "tensorboard", "model", "adapter"
  )
  shutil.copytree(results, out, ignore=skip)
  docs = tmp_path / "docs" / "replication.md"
  docs.parent.mkdir()
  shutil.copy(os.path.join(REPO, "docs", "replication.md"), docs)
  args = ["--preset", preset, "--seeds", str(seeds), "--out", str(out), "--report-only"]
  assert main([*args, "--docs", str(docs)]) == 0
  report = (out / "report" / "report.md").read_text()
  assert "## Held-out NLL over the stages" in report
  finished = [d for d in (out / "runs").glob("*/seed*") if (d / "summary.json").exists()]
  assert finished and f"{len(finished)} of {runs} runs finished" in report
  committed, _, _ = runner.docs_block(os.path.join(REPO, "docs", "replication.md"), preset)
  assert docs.read_text() == committed
