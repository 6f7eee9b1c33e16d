"""``python -m epi_jax.demo``: the runner's ``demo`` preset, its verdict and its report."""

import dataclasses
import os

import pytest

from epi_jax import demo
from epi_jax.replicate import grid, runner
from epi_jax.train.loading import load_config, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = """
model: {preset: tiny, hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2}
data: {tasks: [logic_choice, rewrite], n_train: 32, n_eval: 4, seq_len: 112}
method: {probe_steps: 2}
optim: {lr: 3.0e-3, batch_size: 8}
train: {steps_per_stage: 3}
checkpoint: {every: 0}
eval: {max_new_tokens: 4, batch_size: 4, analyses: [continual, nll], probe_tasks: [dialogue]}
log: {every: 1, tensorboard: false}
"""


def test_the_example_config_is_the_cpu_scratch_preset_run_with_epi():
  """configs/demo.yaml is cpu_scratch's run: only the method (and where runs go) differ."""
  demo_config, preset = (
      to_dict(load_config(os.path.join(ROOT, "configs", *path)))
      for path in (("demo.yaml",), ("replicate", "cpu_scratch.yaml"))
  )
  for config in (demo_config, preset):
    del config["method"], config["run_dir"]
  assert demo_config == preset


def test_the_demo_trains_the_cpu_grids_seed_0_runs_from_the_same_base():
  """The same base folder and the same overrides as the cpu grid's runs, the analyses aside
  (no analysis touches the training)."""
  out = "/tmp/out"
  grid_jobs = {j.entry.name: j for j in runner.plan(grid.PRESETS["cpu"], 1, out)}
  demo_jobs = runner.plan(grid.PRESETS[demo.PRESET], 1, out)
  assert sorted(j.entry.name for j in demo_jobs) == sorted(demo.LABELS)
  assert runner.base_jobs(grid.PRESETS["cpu"], 1, out) == runner.base_jobs(
      grid.PRESETS[demo.PRESET], 1, out
  )

  def training(job):
    return [o for o in job.overrides if not o.startswith("eval.analyses=")]

  for job in demo_jobs:
    assert training(job) == training(grid_jobs[job.entry.name])


def test_the_verdict_states_the_interval_it_rests_on():
  scores = {
      "epi": {"forgetting_ratio_mean": 12.5, "base_forgetting_ratio_mean": 30.0},
      "sequential": {"forgetting_ratio_mean": 40.0, "base_forgetting_ratio_mean": None},
  }
  row = {"mean": -0.0123, "low": -0.02, "high": -0.004, "examples": 128, "seeds": 1}
  line = demo.verdict(row | {"verdict": "less", "quantity": "forgetting"}, scores)
  assert line == (
      "direction only (1 seed): EPI forgets less: held-out NLL forgetting, EPI minus sequential "
      "SFT, -0.0123 nats/token, 95% interval [-0.0200, -0.0040] over 128 examples and 1 seed(s); "
      "stream FR 12.5% vs 40.0%, base-skill FR 30.0% vs n/a."
  )
  across = row | {"low": -0.02, "high": 0.01, "seeds": 5, "verdict": "cannot tell"}
  assert demo.verdict(across | {"quantity": "forgetting"}, scores).startswith(
      "cannot tell (0 inside the interval): "
  )
  more = row | {"mean": 0.02, "low": 0.01, "high": 0.03, "seeds": 5, "verdict": "more"}
  assert demo.verdict(more | {"quantity": "forgetting"}, scores).startswith("EPI forgets more")


@pytest.mark.slow
def test_demo_trains_the_base_then_the_runs_and_prints_the_verdict(tmp_path, capsys, monkeypatch):
  config = tmp_path / "tiny.yaml"
  config.write_text(TINY)
  tiny = dataclasses.replace(
      grid.PRESETS[demo.PRESET],
      configs=((str(config), ("Table 1",)),),
      interval=2,
      h_sweep=(2,),
      base=("method.type=full", "train.steps_per_stage=4", "eval.probe_tasks=[]"),
  )
  monkeypatch.setitem(grid.PRESETS, demo.PRESET, tiny)
  out = tmp_path / "demo"
  assert demo.main(["--out", str(out), "--jobs", "2"]) == 0
  text = capsys.readouterr().out
  for label in demo.LABELS.values():
    assert label in text
  verdict = text.split("verdict: ")[1].splitlines()[0]
  assert "held-out NLL forgetting, EPI minus sequential SFT" in verdict
  assert "95% interval [" in verdict and "over 4 examples and 1 seed(s)" in verdict
  assert "## Verdict" in (out / "report" / "report.md").read_text()
  (base,) = runner.base_jobs(tiny, 1, str(out)).values()
  assert os.path.exists(os.path.join(base.run_dir, "model", "config.json"))
  for job in runner.plan(tiny, 1, str(out)):
    assert os.path.exists(os.path.join(job.run_dir, "summary.json"))
